//! `hearth::image::prepare` end to end on the busybox sample image (no VM boots): layers
//! with whiteouts become the expected root filesystem and a valid ext4 image, a second
//! prepare is a cache hit, and a layer with a `../` entry is refused without writing
//! anything outside the cache.
//!
//! Needs Debian's busybox-static (`/bin/busybox`) and e2fsprogs; skips without them.

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use common::{announce_skip, Need, TempDir};
use hearth::error_chain;
use hearth::image::sample::{self, SampleLayer};
use hearth::image::{build_ext4, prepare, ImageCache};

fn prerequisites() -> bool {
    if let Err(e) = SampleLayer::busybox_base() {
        announce_skip(Need::Tools, &format!("no usable busybox ({e})"));
        return false;
    }
    if !["/usr/sbin/mkfs.ext4", "/sbin/mkfs.ext4"]
        .iter()
        .any(|p| Path::new(p).exists())
    {
        announce_skip(Need::Tools, "mkfs.ext4 missing (install e2fsprogs)");
        return false;
    }
    true
}

fn whiteout_layers() -> Vec<SampleLayer> {
    vec![
        SampleLayer::new()
            .file("etc/motd", "welcome\n")
            .file("srv/www/index.html", "<p>old</p>")
            .file("srv/www/old.css", "x"),
        SampleLayer::new()
            .whiteout("etc/motd")
            .whiteout("bin/wget")
            .opaque("srv/www")
            .file("srv/www/index.html", "<p>new</p>"),
    ]
}

fn debugfs(image: &Path, request: &str) -> String {
    let out = Command::new("debugfs")
        .args(["-R", request])
        .arg(image)
        .output()
        .expect("debugfs runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn oci_layout_with_whiteouts_and_cache_hit() {
    if !prerequisites() {
        return;
    }
    let tmp = TempDir::new("image-layout");
    let layout = tmp.join("busybox");
    sample::busybox_oci_layout(&layout, &whiteout_layers()).unwrap();
    let cache = ImageCache::new(tmp.join("cache"));

    let image = prepare(&layout, &cache).unwrap_or_else(|e| panic!("{}", error_chain(&e)));
    let root = &image.rootfs;
    assert!(root.join("bin/busybox").is_file());
    assert!(!root.join("etc/motd").exists());
    assert!(fs::symlink_metadata(root.join("bin/wget")).is_err());
    assert!(!root.join("srv/www/old.css").exists());
    assert_eq!(
        fs::read(root.join("srv/www/index.html")).unwrap(),
        b"<p>new</p>"
    );
    assert_eq!(fs::metadata(root.join("home/app")).unwrap().uid(), 1000);
    assert_eq!(image.config.cmd, ["sh"]);

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
    let bin = debugfs(&image.ext4, "ls -l /bin");
    assert!(bin.contains("busybox") && !bin.contains("wget"), "{bin}");
    assert!(debugfs(&image.ext4, "cat /srv/www/index.html").contains("<p>new</p>"));

    let start = Instant::now();
    let again = prepare(&layout, &cache).unwrap();
    assert_eq!(again, image);
    assert!(
        start.elapsed().as_millis() < 500,
        "cache hit took {:?}",
        start.elapsed()
    );

    // The docker save form of the same image: same tree.
    let docker = tmp.join("busybox.tar");
    sample::busybox_docker_save(&docker, &whiteout_layers()).unwrap();
    let from_docker = prepare(&docker, &cache).unwrap();
    assert_eq!(from_docker.config, image.config);
    assert_eq!(
        fs::read(from_docker.rootfs.join("srv/www/index.html")).unwrap(),
        b"<p>new</p>"
    );
    assert!(!from_docker.rootfs.join("etc/motd").exists());
}

#[test]
fn dot_dot_layer_is_refused() {
    if !prerequisites() {
        return;
    }
    let tmp = TempDir::new("image-evil");
    let layout = tmp.join("evil");
    let layers = [SampleLayer::new()
        .file("fine", "ok")
        .raw_file("../escaped", "pwned")];
    sample::busybox_oci_layout(&layout, &layers).unwrap();
    let cache_dir = tmp.join("cache");
    let err = prepare(&layout, &ImageCache::new(cache_dir.clone())).unwrap_err();
    let text = error_chain(&err);
    assert!(text.contains("layer 2 (sha256:"), "{text}");
    assert!(
        text.ends_with("entry \"../escaped\" leaves the root"),
        "{text}"
    );
    assert!(!tmp.join("escaped").exists() && !cache_dir.join("escaped").exists());
    assert_eq!(
        fs::read_dir(&cache_dir).unwrap().count(),
        0,
        "nothing cached"
    );
}

#[test]
fn volume_image_has_free_space() {
    if !prerequisites() {
        return;
    }
    let tmp = TempDir::new("image-volume");
    let dir = tmp.join("data");
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("hello.txt"), "hi\n").unwrap();
    let out = tmp.join("data.ext4");
    build_ext4(&dir, &out, 64 << 20).unwrap();
    assert!(fs::metadata(&out).unwrap().len() >= 64 << 20);
    let stats = debugfs(&out, "stats");
    let free: u64 = stats
        .lines()
        .find_map(|l| l.strip_prefix("Free blocks:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{stats}"));
    assert!(free * 4096 >= 64 << 20, "{free} free blocks");
    assert!(debugfs(&out, "cat /hello.txt").contains("hi"));
}
