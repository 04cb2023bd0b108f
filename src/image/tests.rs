//! Tests of [`prepare`] over every kind of source, on the busybox sample image.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use super::layer::tests::temp_dir;
use super::plain::hash_dir;
use super::sample::{self, SampleLayer};
use super::*;
use crate::error_chain;

/// The sample needs the host's static busybox; skip (loudly) without it.
fn have_busybox() -> bool {
    let ok = SampleLayer::busybox_base().is_ok();
    if !ok {
        eprintln!("{} missing or not static: skipped", sample::BUSYBOX);
    }
    ok
}

fn have_mkfs() -> bool {
    ["/usr/sbin/mkfs.ext4", "/sbin/mkfs.ext4"]
        .iter()
        .any(|p| Path::new(p).exists())
}

/// A temp dir holding a cache and sources; removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        Scratch(temp_dir(tag))
    }
    fn cache(&self) -> ImageCache {
        ImageCache::new(self.0.join("cache"))
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn extra_layers() -> Vec<SampleLayer> {
    vec![
        SampleLayer::new()
            .file("etc/motd", "hello\n")
            .dir("opt/data")
            .file("opt/data/old", "old")
            .file_with("bin/suid", "x", 0o4755, 0, 0),
        SampleLayer::new()
            .whiteout("etc/motd")
            .whiteout("bin/ping")
            .opaque("opt/data")
            .file("opt/data/new", "new"),
    ]
}

fn check_sample_rootfs(image: &PreparedImage) {
    let root = &image.rootfs;
    assert!(root.join("bin/busybox").is_file());
    assert_eq!(
        fs::read_link(root.join("bin/sh")).unwrap(),
        Path::new("busybox")
    );
    assert!(fs::read_to_string(root.join("etc/passwd"))
        .unwrap()
        .contains("app:x:1000"));
    assert!(!root.join("etc/motd").exists(), "whiteout");
    assert!(
        fs::symlink_metadata(root.join("bin/ping")).is_err(),
        "whiteout of a symlink"
    );
    assert!(!root.join("opt/data/old").exists(), "opaque");
    assert_eq!(fs::read(root.join("opt/data/new")).unwrap(), b"new");
    assert_eq!(
        fs::metadata(root.join("bin/suid")).unwrap().mode() & 0o7777,
        0o4755
    );
    assert_eq!(
        fs::metadata(root.join("tmp")).unwrap().mode() & 0o7777,
        0o1777
    );
    if layer::privileged() {
        assert_eq!(fs::metadata(root.join("home/app")).unwrap().uid(), 1000);
    }
    assert_eq!(image.config.cmd, ["sh"]);
    assert!(image.config.env[0].starts_with("PATH="));
    assert!(image.digest.starts_with("sha256:") && image.digest.len() == 71);
    assert!(image.ext4.is_file());
}

#[test]
fn oci_layout_with_whiteouts_builds_rootfs_and_ext4() {
    if !have_busybox() || !have_mkfs() {
        return;
    }
    let s = Scratch::new("oci-layout");
    let layout = s.path("layout");
    sample::busybox_oci_layout(&layout, &extra_layers()).unwrap();
    let image = prepare(&layout, &s.cache()).unwrap();
    check_sample_rootfs(&image);
    let hex = image.digest.strip_prefix("sha256:").unwrap();
    assert_eq!(image.rootfs, s.cache().root().join(hex).join("rootfs"));
    assert!(s.cache().root().join(hex).join("complete").exists());

    // The ext4 image holds the tree.
    let fsck = Command::new("e2fsck")
        .arg("-fn")
        .arg(&image.ext4)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    let ls = Command::new("debugfs")
        .args(["-R", "ls -l /bin"])
        .arg(&image.ext4)
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&ls.stdout);
    assert!(
        listing.contains("busybox") && listing.contains(" sh"),
        "{listing}"
    );
    let stat = Command::new("debugfs")
        .args(["-R", "stat /bin/suid"])
        .arg(&image.ext4)
        .output()
        .unwrap();
    let stat = String::from_utf8_lossy(&stat.stdout);
    assert!(stat.contains("Mode:  04755"), "{stat}");

    // No temporary directories are left behind.
    let leftovers: Vec<_> = fs::read_dir(s.cache().root())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().starts_with(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn cache_hit_reads_only_metadata() {
    if !have_busybox() || !have_mkfs() {
        return;
    }
    let s = Scratch::new("cache-hit");
    let layout = s.path("layout");
    sample::busybox_oci_layout(&layout, &[]).unwrap();
    let first = prepare(&layout, &s.cache()).unwrap();
    // Break every layer blob: a hit must not read them.
    let manifest_layers = fs::read_dir(layout.join("blobs/sha256")).unwrap();
    for entry in manifest_layers {
        let path = entry.unwrap().path();
        if fs::metadata(&path).unwrap().len() > 100_000 {
            fs::write(&path, b"garbage").unwrap();
        }
    }
    let start = Instant::now();
    let second = prepare(&layout, &s.cache()).unwrap();
    assert_eq!(first, second);
    assert!(start.elapsed().as_millis() < 500, "{:?}", start.elapsed());
}

#[test]
fn archives_and_docker_save_match_the_layout() {
    if !have_busybox() || !have_mkfs() {
        return;
    }
    let s = Scratch::new("formats");
    let extra = extra_layers();
    let layout = s.path("layout");
    sample::busybox_oci_layout(&layout, &extra).unwrap();
    let reference = prepare(&layout, &s.cache()).unwrap();
    let expected = hash_dir(&reference.rootfs).unwrap();

    let tar = s.path("image.tar");
    sample::busybox_oci_archive(&tar, &extra, false).unwrap();
    // Same manifest, so a cache hit; check with a separate cache too.
    assert_eq!(prepare(&tar, &s.cache()).unwrap(), reference);
    let own_cache = ImageCache::new(s.path("cache-tar"));
    let from_tar = prepare(&tar, &own_cache).unwrap();
    assert_eq!(from_tar.digest, reference.digest);
    assert_eq!(hash_dir(&from_tar.rootfs).unwrap(), expected);

    let tgz = s.path("image.tar.gz");
    sample::busybox_oci_archive(&tgz, &extra, true).unwrap();
    let from_tgz = prepare(&tgz, &ImageCache::new(s.path("cache-tgz"))).unwrap();
    assert_eq!(hash_dir(&from_tgz.rootfs).unwrap(), expected);
    assert_eq!(prepare(&tgz, &s.cache()).unwrap(), reference);

    let docker = s.path("docker.tar");
    sample::busybox_docker_save(&docker, &extra).unwrap();
    let from_docker = prepare(&docker, &s.cache()).unwrap();
    assert_ne!(
        from_docker.digest, reference.digest,
        "image ID, not manifest digest"
    );
    assert_eq!(from_docker.config, reference.config);
    assert_eq!(hash_dir(&from_docker.rootfs).unwrap(), expected);
    check_sample_rootfs(&from_docker);
    // Again: a hit.
    assert_eq!(prepare(&docker, &s.cache()).unwrap(), from_docker);
}

#[test]
fn malicious_layer_is_refused_and_leaves_nothing() {
    if !have_busybox() || !have_mkfs() {
        return;
    }
    let s = Scratch::new("evil");
    let outside = s.path("outside");
    fs::create_dir_all(&outside).unwrap();
    let evil = [
        SampleLayer::new().raw_symlink("escape", outside.to_str().unwrap()),
        SampleLayer::new()
            .file("escape/inside-after-all", "x")
            .raw_file("../evil", "pwned"),
    ];
    let layout = s.path("layout");
    sample::busybox_oci_layout(&layout, &evil).unwrap();
    let err = prepare(&layout, &s.cache()).unwrap_err();
    let text = error_chain(&err);
    assert!(
        text.starts_with(&format!(
            "OCI image layout {}: layer 3 (sha256:",
            layout.display()
        )),
        "{text}"
    );
    assert!(
        text.ends_with(": entry \"../evil\" leaves the root"),
        "{text}"
    );
    assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
    assert!(!s.0.join("evil").exists() && !s.path("cache/evil").exists());
    // No cache entry and no temporary directory.
    assert_eq!(fs::read_dir(s.cache().root()).unwrap().count(), 0);

    let docker = s.path("docker.tar");
    sample::busybox_docker_save(&docker, &evil).unwrap();
    let text = error_chain(&prepare(&docker, &s.cache()).unwrap_err());
    assert!(
        text.starts_with(&format!("docker save archive {}: layer ", docker.display())),
        "{text}"
    );
    assert!(
        text.ends_with("/layer.tar: entry \"../evil\" leaves the root"),
        "{text}"
    );
    assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
}

#[test]
fn digest_mismatches_are_refused() {
    if !have_busybox() || !have_mkfs() {
        return;
    }
    let s = Scratch::new("mismatch");
    let layout = s.path("layout");
    let extra = [SampleLayer::new().file("a", "original-marker-0x5eed")];
    sample::busybox_oci_layout(&layout, &extra).unwrap();
    // Swap the extra layer's content for another valid tar under the same name.
    let tampered = SampleLayer::new().file("a", "tampered").to_tar().unwrap();
    let original = SampleLayer::new()
        .file("a", "original-marker-0x5eed")
        .to_tar()
        .unwrap();
    let blob = layout
        .join("blobs/sha256")
        .join(store::sha256_hex(&original));
    fs::write(&blob, &tampered).unwrap();
    let text = error_chain(&prepare(&layout, &s.cache()).unwrap_err());
    assert!(text.contains("layer 2 (sha256:"), "{text}");
    assert!(
        text.contains(": sha256 mismatch (expected sha256:"),
        "{text}"
    );

    // A manifest that does not match its digest.
    let layout2 = s.path("layout2");
    sample::busybox_oci_layout(&layout2, &[]).unwrap();
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(layout2.join("index.json")).unwrap()).unwrap();
    let digest = index["manifests"][0]["digest"].as_str().unwrap();
    let manifest_path = layout2.join("blobs/sha256").join(&digest[7..]);
    let mut manifest = fs::read(&manifest_path).unwrap();
    manifest.push(b' ');
    fs::write(&manifest_path, manifest).unwrap();
    let text = error_chain(&prepare(&layout2, &s.cache()).unwrap_err());
    assert!(
        text.contains("manifest sha256:") && text.contains("sha256 mismatch"),
        "{text}"
    );

    // docker save: a layer that does not match its diff_id.
    let docker = s.path("docker.tar");
    sample::busybox_docker_save(&docker, &extra).unwrap();
    let mut bytes = fs::read(&docker).unwrap();
    let at = bytes
        .windows(22)
        .position(|w| w == b"original-marker-0x5eed")
        .expect("layer content in the archive");
    bytes[at..at + 8].copy_from_slice(b"ORIGINAL");
    fs::write(&docker, bytes).unwrap();
    let text = error_chain(&prepare(&docker, &s.cache()).unwrap_err());
    let hex = store::sha256_hex(&original);
    assert!(
        text.starts_with(&format!(
            "docker save archive {}: layer {hex}/layer.tar: sha256 mismatch (expected sha256:{hex}, got sha256:",
            docker.display()
        )),
        "{text}"
    );
}

#[test]
fn plain_directory_and_tarball() {
    if !have_busybox() || !have_mkfs() {
        return;
    }
    let s = Scratch::new("plain");
    let tar = SampleLayer::busybox_base().unwrap().to_tar().unwrap();
    let tar_path = s.path("rootfs.tar");
    fs::write(&tar_path, &tar).unwrap();
    let from_tar = prepare(&tar_path, &s.cache()).unwrap();
    assert_eq!(
        from_tar.digest,
        format!("sha256:{}", store::sha256_hex(&tar))
    );
    assert_eq!(from_tar.config, ImageConfig::default());
    assert_eq!(from_tar.config.cmd, ["/bin/sh"]);
    assert!(from_tar.rootfs.join("bin/busybox").is_file());

    // Gzip: same tree.
    let gz_path = s.path("rootfs.tgz");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &tar).unwrap();
    fs::write(&gz_path, gz.finish().unwrap()).unwrap();
    let from_gz = prepare(&gz_path, &s.cache()).unwrap();
    assert_eq!(
        hash_dir(&from_gz.rootfs).unwrap(),
        hash_dir(&from_tar.rootfs).unwrap()
    );

    // A directory: copied, hashed by content; an edit gives a new digest.
    let dir = s.path("rootfs-dir");
    fs::create_dir_all(&dir).unwrap();
    plain::copy_dir(&from_tar.rootfs, &dir).unwrap();
    let from_dir = prepare(&dir, &s.cache()).unwrap();
    assert_eq!(
        hash_dir(&from_dir.rootfs).unwrap(),
        hash_dir(&from_tar.rootfs).unwrap()
    );
    assert_eq!(prepare(&dir, &s.cache()).unwrap(), from_dir);
    fs::write(dir.join("etc/hostname"), "edited\n").unwrap();
    let edited = prepare(&dir, &s.cache()).unwrap();
    assert_ne!(edited.digest, from_dir.digest);
    assert_eq!(
        fs::read(edited.rootfs.join("etc/hostname")).unwrap(),
        b"edited\n"
    );

    // :REF only applies to images.
    let err = prepare(Path::new(&format!("{}:latest", dir.display())), &s.cache()).unwrap_err();
    assert!(matches!(err, ImageError::ReferenceNotSupported(_)), "{err}");
}

#[test]
fn several_manifests_need_a_reference() {
    if !have_busybox() || !have_mkfs() {
        return;
    }
    let s = Scratch::new("refs");
    let a = s.path("a");
    let b = s.path("b");
    sample::busybox_oci_layout(&a, &[SampleLayer::new().file("which", "a")]).unwrap();
    sample::busybox_oci_layout(&b, &[SampleLayer::new().file("which", "b")]).unwrap();
    // Merge b into a under the name "other".
    for entry in fs::read_dir(b.join("blobs/sha256")).unwrap() {
        let entry = entry.unwrap();
        fs::copy(entry.path(), a.join("blobs/sha256").join(entry.file_name())).unwrap();
    }
    let read = |p: &Path| -> serde_json::Value {
        serde_json::from_slice(&fs::read(p.join("index.json")).unwrap()).unwrap()
    };
    let mut index = read(&a);
    let mut other = read(&b)["manifests"][0].clone();
    other["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": "other"});
    index["manifests"].as_array_mut().unwrap().push(other);
    fs::write(a.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();

    let text = error_chain(&prepare(&a, &s.cache()).unwrap_err());
    assert!(
        text.ends_with(
            "several images (latest, other); choose one by appending :REF to the image path"
        ),
        "{text}"
    );
    let latest = prepare(Path::new(&format!("{}:latest", a.display())), &s.cache()).unwrap();
    assert_eq!(fs::read(latest.rootfs.join("which")).unwrap(), b"a");
    let other = prepare(Path::new(&format!("{}:other", a.display())), &s.cache()).unwrap();
    assert_eq!(fs::read(other.rootfs.join("which")).unwrap(), b"b");
    let text =
        error_chain(&prepare(Path::new(&format!("{}:nope", a.display())), &s.cache()).unwrap_err());
    assert!(text.contains("no image named \"nope\""), "{text}");
}

#[test]
fn nested_index_picks_linux_amd64() {
    if !have_busybox() || !have_mkfs() {
        return;
    }
    let s = Scratch::new("nested");
    let layout = s.path("layout");
    sample::busybox_oci_layout(&layout, &[]).unwrap();
    let index_path = layout.join("index.json");
    let top: serde_json::Value = serde_json::from_slice(&fs::read(&index_path).unwrap()).unwrap();
    let amd64 = top["manifests"][0].clone();
    let mut arm64 = amd64.clone();
    arm64["platform"] = serde_json::json!({"architecture": "arm64", "os": "linux"});
    arm64["digest"] = serde_json::json!(format!("sha256:{}", "0".repeat(64)));
    let nested = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [arm64, amd64],
    }))
    .unwrap();
    let hex = store::sha256_hex(&nested);
    fs::write(layout.join("blobs/sha256").join(&hex), &nested).unwrap();
    let new_top = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "digest": format!("sha256:{hex}"),
            "size": nested.len(),
        }],
    });
    fs::write(&index_path, serde_json::to_vec(&new_top).unwrap()).unwrap();
    let image = prepare(&layout, &s.cache()).unwrap();
    assert_eq!(
        image.digest,
        top["manifests"][0]["digest"].as_str().unwrap()
    );
}

#[test]
fn zstd_layers_are_unsupported() {
    if !have_busybox() || !have_mkfs() {
        return;
    }
    let s = Scratch::new("zstd");
    let layout = s.path("layout");
    sample::busybox_oci_layout(&layout, &[]).unwrap();
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
    let digest = index["manifests"][0]["digest"].as_str().unwrap();
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(layout.join("blobs/sha256").join(&digest[7..])).unwrap())
            .unwrap();
    manifest["layers"][0]["mediaType"] = "application/vnd.oci.image.layer.v1.tar+zstd".into();
    let bytes = serde_json::to_vec(&manifest).unwrap();
    let hex = store::sha256_hex(&bytes);
    fs::write(layout.join("blobs/sha256").join(&hex), &bytes).unwrap();
    let mut index = index.clone();
    index["manifests"][0]["digest"] = format!("sha256:{hex}").into();
    index["manifests"][0]["size"] = bytes.len().into();
    fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&index).unwrap(),
    )
    .unwrap();
    let text = error_chain(&prepare(&layout, &s.cache()).unwrap_err());
    assert!(
        text.contains("unsupported layer media type application/vnd.oci.image.layer.v1.tar+zstd"),
        "{text}"
    );
}

#[test]
fn concurrent_prepares_agree() {
    if !have_busybox() || !have_mkfs() {
        return;
    }
    let s = Scratch::new("race");
    let layout = s.path("layout");
    sample::busybox_oci_layout(&layout, &[]).unwrap();
    let cache = s.cache();
    let results: Vec<PreparedImage> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..3)
            .map(|_| scope.spawn(|| prepare(&layout, &cache).unwrap()))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(results.windows(2).all(|w| w[0] == w[1]));
    assert!(results[0].rootfs.join("bin/busybox").is_file());
    let names: Vec<_> = fs::read_dir(cache.root())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
}

#[test]
fn default_location_and_missing_sources() {
    let cache = ImageCache::default_location().unwrap();
    assert!(cache.root().ends_with("images"));
    let s = Scratch::new("none");
    let err = prepare(Path::new("/nonexistent/image"), &s.cache()).unwrap_err();
    assert!(
        error_chain(&err).starts_with("cannot open image /nonexistent/image: "),
        "{err}"
    );
}

#[test]
fn oci_index_wins_over_docker_manifest() {
    if !have_busybox() || !have_mkfs() {
        return;
    }
    // docker 25+ saves hold both; the OCI index must be used.
    let s = Scratch::new("both");
    let layout = s.path("layout");
    sample::busybox_oci_layout(&layout, &[]).unwrap();
    let docker_manifest = r#"[{"Config":"missing.json","RepoTags":["x:latest"],"Layers":[]}]"#;
    fs::write(layout.join("manifest.json"), docker_manifest).unwrap();
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
    let image = prepare(&layout, &s.cache()).unwrap();
    assert_eq!(
        image.digest,
        index["manifests"][0]["digest"].as_str().unwrap()
    );
}

#[test]
fn non_archives_are_refused() {
    let s = Scratch::new("junk");
    let junk = s.path("junk");
    fs::write(&junk, b"not an image").unwrap();
    let text = error_chain(&prepare(&junk, &s.cache()).unwrap_err());
    assert!(
        text.contains("not a directory, tar or tar.gz archive"),
        "{text}"
    );
    let zstd = s.path("image.tar.zst");
    fs::write(&zstd, [0x28, 0xb5, 0x2f, 0xfd, 0, 0, 0, 0]).unwrap();
    let text = error_chain(&prepare(&zstd, &s.cache()).unwrap_err());
    assert!(
        text.contains("unsupported zstd-compressed archive"),
        "{text}"
    );
}

#[test]
fn dir_ref_split_lets_the_reference_hold_colons() {
    let dir = temp_dir("split-ref");
    let layout = dir.join("lay:out");
    fs::create_dir_all(&layout).unwrap();
    let shown = layout.display().to_string();
    let split = |s: String| split_reference(Path::new(&s));
    assert_eq!(
        split(format!("{shown}:127.0.0.1:5000/x:y")),
        (layout.clone(), Some("127.0.0.1:5000/x:y".to_string()))
    );
    assert_eq!(
        split(format!("{shown}:latest")),
        (layout.clone(), Some("latest".to_string()))
    );
    // An existing path is never split; a missing DIR is no reference.
    assert_eq!(split(shown.clone()), (layout.clone(), None));
    let missing = format!("{}/nope:tag", dir.display());
    assert_eq!(split(missing.clone()), (PathBuf::from(missing), None));
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn image_arg_that_is_no_reference_fails_as_a_path() {
    let dir = temp_dir("image-arg");
    let cache = ImageCache::new(dir.join("cache"));
    let err = prepare_image_arg(
        Path::new("/nonexistent/busybox.tar"),
        &pull::PullOptions::default(),
        pull::PullPolicy::Never,
        &cache,
    )
    .unwrap_err();
    assert_eq!(
        error_chain(&err),
        "cannot open image /nonexistent/busybox.tar: No such file or directory (os error 2)"
    );
    fs::remove_dir_all(&dir).unwrap();
}
