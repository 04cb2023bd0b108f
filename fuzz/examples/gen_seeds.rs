//! Writes the seed inputs of `hearth_fuzz::seeds` to `fuzz/seeds/<target>/<name>`.
//! Run from anywhere: `cargo run --manifest-path fuzz/Cargo.toml --example gen_seeds`.

fn main() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
    for (target, name, bytes) in hearth_fuzz::seeds::all() {
        let target_dir = dir.join(target);
        std::fs::create_dir_all(&target_dir).expect("create the seed directory");
        let path = target_dir.join(name);
        std::fs::write(&path, &bytes).expect("write a seed");
        println!("{} ({} bytes)", path.display(), bytes.len());
    }
}
