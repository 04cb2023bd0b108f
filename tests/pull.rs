//! `hearth pull` and `container run REF` against a real registry: Debian's
//! docker-registry (the distribution project's registry) on 127.0.0.1, filled with skopeo
//! from the busybox OCI layouts `hearth::image::sample` builds. Only the last test boots a
//! VM; the rest need no KVM.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine;
use common::{describe, stderr_of, stdout_of, Need, TempDir};
use hearth::image::pull::{self, Layout, PullOptions, PullPolicy};
use hearth::image::{sample, ImageCache};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// Whether the registry tools are installed; a loud skip (or a failure in CI) otherwise.
fn have_registry_tools() -> bool {
    for tool in ["docker-registry", "skopeo", "htpasswd"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            common::announce_skip(Need::Registry, &format!("{tool} is not installed"));
            return false;
        }
    }
    true
}

/// A docker-registry serving a temporary directory on a free loopback port; stopped
/// when dropped.
struct Registry {
    child: Child,
    dir: TempDir,
    port: u16,
}

impl Registry {
    /// Starts a registry; with `user`, it requires basic auth as that user.
    fn start(user: Option<(&str, &str)>) -> Registry {
        let dir = TempDir::new("pull-registry");
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut config = format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n\
             http:\n  addr: 127.0.0.1:{port}\n",
            dir.join("storage").display()
        );
        if let Some((name, password)) = user {
            let out = Command::new("htpasswd")
                .args(["-Bbn", name, password])
                .output()
                .unwrap();
            assert!(out.status.success(), "{}", describe(&out));
            std::fs::write(dir.join("htpasswd"), &out.stdout).unwrap();
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: hearth-test\n    path: {}\n",
                dir.join("htpasswd").display()
            ));
        }
        std::fs::write(dir.join("config.yml"), config).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(dir.join("config.yml"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("registry.log")).unwrap())
            .spawn()
            .unwrap();
        let registry = Registry { child, dir, port };
        registry.wait_ready();
        registry
    }

    /// Waits until `/v2/` answers (200, or 401 with auth).
    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let request = format!(
                    "GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\n\r\n",
                    self.port
                );
                let mut answer = String::new();
                if stream.write_all(request.as_bytes()).is_ok()
                    && stream.read_to_string(&mut answer).is_ok()
                    && answer.starts_with("HTTP/1.1 ")
                {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "docker-registry did not answer: {}",
                std::fs::read_to_string(self.dir.join("registry.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Pushes `image` (`oci:DIR:REF`) as `repo_tag` (`x:y`); `all` pushes every platform
    /// of an index.
    fn push(&self, image: &str, repo_tag: &str, creds: Option<&str>, all: bool) {
        let mut cmd = Command::new("skopeo");
        cmd.args([
            "--insecure-policy",
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
        ]);
        if all {
            cmd.arg("--all");
        }
        if let Some(creds) = creds {
            cmd.args(["--dest-creds", creds]);
        }
        cmd.arg(image)
            .arg(format!("docker://{}/{repo_tag}", self.host()));
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "skopeo: {}", describe(&out));
    }

    /// The file the registry keeps blob `hex` in.
    fn blob_data(&self, hex: &str) -> PathBuf {
        self.dir.join(&format!(
            "storage/docker/registry/v2/blobs/sha256/{}/{hex}/data",
            &hex[..2]
        ))
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A scratch directory with hearth's cache and a HOME without docker credentials.
struct Scratch {
    dir: TempDir,
}

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = TempDir::new(&format!("pull-{name}"));
        std::fs::create_dir_all(dir.join("home")).unwrap();
        Scratch { dir }
    }

    fn cache(&self) -> PathBuf {
        self.dir.join("cache")
    }

    fn layout(&self) -> Layout {
        Layout::at(self.cache().join("registry"))
    }

    fn hearth(&self) -> Command {
        let mut cmd = common::hearth();
        cmd.env("HEARTH_CACHE", self.cache())
            .env("HOME", self.dir.join("home"))
            .env_remove("REGISTRY_AUTH_FILE");
        cmd
    }

    fn pull(&self, args: &[&str]) -> Output {
        let mut cmd = self.hearth();
        cmd.arg("pull").args(args);
        common::run_with_timeout(cmd, Duration::from_secs(120))
    }

    /// Blob name -> modification time, in the pull cache.
    fn blob_times(&self) -> Vec<(String, SystemTime)> {
        let mut times: Vec<(String, SystemTime)> =
            std::fs::read_dir(self.cache().join("registry/blobs/sha256"))
                .unwrap()
                .map(|e| {
                    let e = e.unwrap();
                    let name = e.file_name().to_string_lossy().into_owned();
                    (name, e.metadata().unwrap().modified().unwrap())
                })
                .collect();
        times.sort();
        times
    }
}

fn sha256(bytes: &[u8]) -> String {
    let hex: String = Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256:{hex}")
}

/// The busybox sample as an OCI layout in `dir`, and its manifest digest.
fn busybox_layout(dir: &Path) -> (PathBuf, String) {
    let layout = dir.join("busybox-oci");
    sample::busybox_oci_layout(&layout, &[]).unwrap();
    let index: Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let digest = index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    (layout, digest)
}

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn write_blob(layout: &Path, value: &Value) -> (String, u64) {
    let bytes = serde_json::to_vec(value).unwrap();
    let digest = sha256(&bytes);
    let hex = digest.strip_prefix("sha256:").unwrap();
    std::fs::write(layout.join("blobs/sha256").join(hex), &bytes).unwrap();
    (digest, bytes.len() as u64)
}

/// Turns the busybox layout into a two-platform image tagged `multi`: the amd64 manifest
/// and an arm64 one (its config says arm64; the layers are shared), under an index.
/// Returns the two manifest digests.
fn make_multi_arch(layout: &Path, amd64: &str) -> (String, String) {
    let blobs = layout.join("blobs/sha256");
    let manifest = read_json(&blobs.join(amd64.strip_prefix("sha256:").unwrap()));
    let config_hex = manifest["config"]["digest"].as_str().unwrap();
    let mut config = read_json(&blobs.join(config_hex.strip_prefix("sha256:").unwrap()));
    config["architecture"] = json!("arm64");
    let (config_digest, config_size) = write_blob(layout, &config);
    let mut arm = manifest.clone();
    arm["config"]["digest"] = json!(config_digest);
    arm["config"]["size"] = json!(config_size);
    let (arm64, arm_size) = write_blob(layout, &arm);
    let amd_size = std::fs::metadata(blobs.join(amd64.strip_prefix("sha256:").unwrap()))
        .unwrap()
        .len();
    let entry = |digest: &str, size: u64, arch: &str| {
        json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest, "size": size,
            "platform": {"os": "linux", "architecture": arch},
        })
    };
    let nested = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [entry(&arm64, arm_size, "arm64"), entry(amd64, amd_size, "amd64")],
    });
    let (index_digest, index_size) = write_blob(layout, &nested);
    let top = json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "digest": index_digest, "size": index_size,
            "annotations": {"org.opencontainers.image.ref.name": "multi"},
        }],
    });
    std::fs::write(layout.join("index.json"), serde_json::to_vec(&top).unwrap()).unwrap();
    (amd64.to_string(), arm64)
}

fn count(text: &str, needle: &str) -> usize {
    text.matches(needle).count()
}

#[test]
fn pull_by_tag_and_digest_and_again_downloads_nothing() {
    if !have_registry_tools() {
        return;
    }
    let registry = Registry::start(None);
    let scratch = Scratch::new("tag");
    let (layout, manifest_digest) = busybox_layout(scratch.dir.path());
    registry.push(
        &format!("oci:{}:latest", layout.display()),
        "x:y",
        None,
        false,
    );
    let name = format!("{}/x:y", registry.host());

    let out = scratch.pull(&[&name]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let stdout = stdout_of(&out);
    assert_eq!(
        stdout,
        format!("Digest: {manifest_digest}\nStatus: Downloaded newer image for {name}\n{name}\n")
    );
    // The config and the one layer, each downloaded once.
    let stderr = stderr_of(&out);
    assert_eq!(count(&stderr, ": Pull complete"), 2, "{stderr}");
    let before = scratch.blob_times();
    // Manifest, config, layer.
    assert_eq!(before.len(), 3, "{before:?}");

    let out = scratch.pull(&[&name]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(stdout_of(&out).contains(&format!("Status: Image is up to date for {name}\n")));
    let stderr = stderr_of(&out);
    assert_eq!(count(&stderr, ": Pull complete"), 0, "{stderr}");
    assert_eq!(count(&stderr, ": Already exists"), 2, "{stderr}");
    assert_eq!(scratch.blob_times(), before, "a second pull rewrote blobs");

    let by_digest = format!("{}/x@{manifest_digest}", registry.host());
    let out = scratch.pull(&["-q", &by_digest]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(stdout_of(&out), format!("{by_digest}\n"));
    assert_eq!(stderr_of(&out), "");
    assert_eq!(scratch.blob_times(), before);

    // Another name of the same image (docker's loopback rule holds for `localhost`
    // too) shares every blob.
    let local_name = format!("localhost:{}/x:y", registry.port);
    let out = scratch.pull(&[&local_name]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(
        count(&stderr_of(&out), ": Already exists"),
        2,
        "{}",
        describe(&out)
    );
    assert_eq!(scratch.blob_times(), before);

    // The pulled image is the archive's image: same digest, same config, same files.
    let pulled = pull::resolve(
        &name,
        &PullOptions::default(),
        PullPolicy::Never,
        &scratch.layout(),
    )
    .unwrap();
    assert_eq!(pulled.manifest_digest, manifest_digest);
    let from_registry =
        hearth::image::prepare_pulled(&pulled, &ImageCache::new(scratch.dir.join("a"))).unwrap();
    let from_layout =
        hearth::image::prepare(&layout, &ImageCache::new(scratch.dir.join("b"))).unwrap();
    assert_eq!(from_registry.digest, from_layout.digest);
    assert_eq!(from_registry.config, from_layout.config);
    assert!(from_registry.rootfs.join("bin/busybox").is_file());
    // The pull cache is an OCI layout `prepare` reads by reference too.
    let by_name = hearth::image::prepare(
        Path::new(&format!("{}:{name}", scratch.layout().root().display())),
        &ImageCache::new(scratch.dir.join("a")),
    )
    .unwrap();
    assert_eq!(by_name.digest, from_layout.digest);
}

#[test]
fn unknown_tag_and_unreachable_registry_are_one_line_errors() {
    if !have_registry_tools() {
        return;
    }
    let registry = Registry::start(None);
    let scratch = Scratch::new("unknown");
    let name = format!("{}/x:nope", registry.host());
    let out = scratch.pull(&[&name]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert_eq!(
        stderr_of(&out),
        format!(
            "hearth: {name}: manifest unknown (no such tag or digest in {})\n",
            registry.host()
        )
    );

    // Nothing listens on a port just freed.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = scratch.pull(&[&format!("127.0.0.1:{port}/x:y")]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let stderr = stderr_of(&out);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with(&format!(
            "hearth: cannot pull 127.0.0.1:{port}/x:y from 127.0.0.1:{port}: "
        )) && stderr.contains("onnection refused"),
        "{stderr}"
    );
}

#[test]
fn an_index_resolves_to_the_requested_platform() {
    if !have_registry_tools() {
        return;
    }
    let registry = Registry::start(None);
    let scratch = Scratch::new("multi");
    let (layout, amd64_digest) = busybox_layout(scratch.dir.path());
    let (amd64, arm64) = make_multi_arch(&layout, &amd64_digest);
    registry.push(
        &format!("oci:{}:multi", layout.display()),
        "m:1",
        None,
        true,
    );
    let name = format!("{}/m:1", registry.host());

    let resolve = |platform: &str| {
        let options = PullOptions {
            platform: platform.parse().unwrap(),
            quiet: true,
            ..PullOptions::default()
        };
        pull::resolve(&name, &options, PullPolicy::Always, &scratch.layout())
    };
    let pulled = resolve("linux/amd64").unwrap();
    assert_eq!(pulled.manifest_digest, amd64);
    assert_ne!(pulled.digest, amd64, "the digest shown is the index's");
    assert_eq!(resolve("linux/arm64").unwrap().manifest_digest, arm64);
    let err = resolve("linux/s390x").unwrap_err().to_string();
    assert_eq!(
        err,
        "the image has no linux/s390x manifest (it has linux/arm64, linux/amd64)"
    );

    let out = scratch.pull(&["--platform", "linux/arm64", "-q", &name]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let out = scratch.pull(&["--platform", "linux/ppc64le", &name]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(stderr_of(&out).contains("(it has linux/arm64, linux/amd64)"));
    // Each platform is its own entry of the pull cache.
    let index = read_json(&scratch.layout().root().join("index.json"));
    assert_eq!(index["manifests"].as_array().unwrap().len(), 2, "{index}");
}

#[test]
fn basic_auth_needs_the_auth_file() {
    if !have_registry_tools() {
        return;
    }
    let registry = Registry::start(Some(("hearth", "s3cret")));
    let scratch = Scratch::new("auth");
    let (layout, _) = busybox_layout(scratch.dir.path());
    registry.push(
        &format!("oci:{}:latest", layout.display()),
        "private/x:y",
        Some("hearth:s3cret"),
        false,
    );
    let name = format!("{}/private/x:y", registry.host());
    let host = registry.host();

    let out = scratch.pull(&[&name]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert_eq!(
        stderr_of(&out),
        format!(
            "hearth: {host}: authentication required (401 Unauthorized): no credentials for \
             {host} (log in with docker or podman, or set REGISTRY_AUTH_FILE)\n"
        )
    );

    let auth_file = scratch.dir.join("auth.json");
    let write_auth = |user_pass: &str| {
        let auth = base64::engine::general_purpose::STANDARD.encode(user_pass);
        std::fs::write(
            &auth_file,
            json!({"auths": {host.clone(): {"auth": auth}}}).to_string(),
        )
        .unwrap();
    };
    write_auth("hearth:wrong");
    let mut cmd = scratch.hearth();
    cmd.env("REGISTRY_AUTH_FILE", &auth_file)
        .args(["pull", &name]);
    let out = common::run_with_timeout(cmd, Duration::from_secs(120));
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        stderr_of(&out).contains("were refused"),
        "{}",
        describe(&out)
    );

    write_auth("hearth:s3cret");
    let mut cmd = scratch.hearth();
    cmd.env("REGISTRY_AUTH_FILE", &auth_file)
        .args(["pull", &name]);
    let out = common::run_with_timeout(cmd, Duration::from_secs(120));
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(stdout_of(&out).ends_with(&format!("\n{name}\n")));

    // docker's own file works the same: ~/.docker/config.json.
    let docker_config = scratch.dir.join("home/.docker/config.json");
    std::fs::create_dir_all(docker_config.parent().unwrap()).unwrap();
    std::fs::rename(&auth_file, &docker_config).unwrap();
    let out = scratch.pull(&["-q", &name]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
}

#[test]
fn a_tampered_blob_is_refused_and_not_cached() {
    if !have_registry_tools() {
        return;
    }
    let registry = Registry::start(None);
    let scratch = Scratch::new("tamper");
    let (layout, manifest_digest) = busybox_layout(scratch.dir.path());
    registry.push(
        &format!("oci:{}:latest", layout.display()),
        "t:1",
        None,
        false,
    );
    let manifest = read_json(
        &layout
            .join("blobs/sha256")
            .join(manifest_digest.strip_prefix("sha256:").unwrap()),
    );
    let layer = manifest["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let layer_hex = layer.strip_prefix("sha256:").unwrap();
    // Same size, one byte changed in the middle.
    let data = registry.blob_data(layer_hex);
    let mut bytes = std::fs::read(&data).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&data, &bytes).unwrap();

    let out = scratch.pull(&[&format!("{}/t:1", registry.host())]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert_eq!(
        stderr_of(&out)
            .lines()
            .filter(|l| l.starts_with("hearth: "))
            .collect::<Vec<_>>(),
        [format!(
            "hearth: blob {layer} from {}: digest mismatch (got {})",
            registry.host(),
            sha256(&bytes)
        )]
    );
    let cached: Vec<String> = scratch.blob_times().into_iter().map(|(n, _)| n).collect();
    assert!(
        !cached
            .iter()
            .any(|n| n == layer_hex || n.starts_with(".tmp")),
        "{cached:?}"
    );
    // Not recorded either: a cache-only run does not find it.
    let out = {
        let mut cmd = scratch.hearth();
        cmd.args(["container", "run", "--pull", "never"])
            .arg(format!("{}/t:1", registry.host()))
            .arg("true");
        common::run_with_timeout(cmd, Duration::from_secs(60))
    };
    assert_eq!(out.status.code(), Some(125), "{}", describe(&out));
    assert!(
        stderr_of(&out).contains("has not been pulled"),
        "{}",
        describe(&out)
    );
}

#[test]
fn a_pulled_image_runs_in_a_vm() {
    if !have_registry_tools() {
        return;
    }
    if !common::kvm_available() {
        common::announce_skip(Need::Kvm, "/dev/kvm is not usable");
        return;
    }
    let registry = Registry::start(None);
    let scratch = Scratch::new("run");
    let (layout, _) = busybox_layout(scratch.dir.path());
    registry.push(
        &format!("oci:{}:latest", layout.display()),
        "r:1",
        None,
        false,
    );
    let mut cmd = common::container::hearth_in(
        &scratch.cache(),
        &scratch.dir.join("templates"),
        &scratch.dir.join("state"),
    );
    cmd.env("HOME", scratch.dir.join("home"))
        .args(["container", "run", "--pull", "missing"])
        .arg(format!("{}/r:1", registry.host()))
        .args(["echo", "hi"]);
    let out = common::container::run(cmd);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(stdout_of(&out), "hi\n", "{}", describe(&out));
    assert!(
        stderr_of(&out).contains(": Pull complete"),
        "{}",
        describe(&out)
    );
}
