//! Host folders shared over virtio-fs, end to end: `hearth container run -v` (a fresh
//! microVM restored from a template, with virtiofsd back ends hearth starts and stops)
//! and `hearth machine start --share` with containers in the machine binding folders
//! under it. Each test boots at most one VM shape (a template, then restores).
//!
//! They need root (virtiofsd's namespaces) and QEMU's virtiofsd (`qemu-system-common`);
//! without either they skip loudly, and with `HEARTH_REQUIRE` (CI) they fail.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::container::{assert_status, run};
use common::linux::MINIMAL_TIMEOUT;
use common::{describe, stderr_of, stdout_of, Need};
use hearth::image::sample;

/// Where this test keeps images, state and the folders it shares.
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("volumes-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `hearth ARGS` with the cache, templates and state of this test.
fn hearth(scratch: &Path) -> Command {
    common::container::hearth_in(
        &scratch.join("cache"),
        &Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("volumes-templates-{}", std::process::id())),
        &scratch.join("state"),
    )
}

/// Whether shared folders can work here: KVM, root, and a virtiofsd.
fn shares_possible() -> bool {
    if !common::kvm_available() {
        return false;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        common::announce_skip(Need::Root, "virtiofsd needs root");
        return false;
    }
    if hearth::container::virtiofsd::find(None).is_err() {
        common::announce_skip(Need::Tools, "no virtiofsd (install qemu-system-common)");
        return false;
    }
    true
}

/// The pids of virtiofsd processes serving a folder under `dir`.
fn backends_under(dir: &Path) -> Vec<String> {
    let dir = std::fs::canonicalize(dir).unwrap();
    let marker = format!("source={}", dir.display());
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|e| {
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            let zombie = stat.rsplit(')').next()?.split_whitespace().next()? == "Z";
            let args: Vec<String> = cmdline
                .split(|&b| b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let ours =
                args.first()?.ends_with("virtiofsd") && args.iter().any(|a| a.starts_with(&marker));
            (ours && !zombie)
                .then(|| format!("{} {}", e.file_name().to_string_lossy(), args.join(" ")))
        })
        .collect()
}

/// Kills a machine's VMM and back ends if the test fails before stopping it.
struct MachineGuard {
    state: PathBuf,
    name: String,
}

impl Drop for MachineGuard {
    fn drop(&mut self) {
        let dir = self.state.join("machines").join(&self.name);
        if std::thread::panicking() {
            let log = std::fs::read_to_string(dir.join("console.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!("--- machine console (last 60 lines) ---");
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
        let info = std::fs::read_to_string(dir.join("machine.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok());
        let Some(info) = info else { return };
        let backends = info["shares"].as_array().cloned().unwrap_or_default();
        let pids = std::iter::once(info["pid"].as_i64())
            .chain(backends.iter().map(|s| s["backend"]["pid"].as_i64()));
        for pid in pids.flatten() {
            // SAFETY: kill(2) on pids hearth recorded for this test's own machine.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
}

/// A container VM with a shared folder, a read-only one and a copied one: writes land
/// on the host at once and the host's files are seen, the read-only folder refuses
/// writes, the copy keeps them to itself, and no back end is left afterwards.
#[test]
fn a_container_shares_host_folders() {
    if !shares_possible() {
        return;
    }
    let dir = scratch("container");
    let image = dir.join("busybox-oci");
    sample::busybox_oci_layout(&image, &[]).expect("build the busybox OCI layout");
    let (data, ro, copy) = (dir.join("data"), dir.join("ro"), dir.join("copy"));
    for folder in [&data, &ro, &copy] {
        std::fs::create_dir_all(folder).unwrap();
    }
    std::fs::write(data.join("from-host"), "host wrote this\n").unwrap();
    std::fs::write(ro.join("fixed"), "read-only\n").unwrap();
    std::fs::write(copy.join("copied"), "copied in\n").unwrap();

    let mut cmd = hearth(&dir);
    cmd.args(["container", "run"])
        .arg("-v")
        .arg(format!("{}:/data", data.display()))
        .arg("-v")
        .arg(format!("{}:/ro:ro", ro.display()))
        .arg("-v")
        .arg(format!("{}:/copy:copy", copy.display()))
        .arg(&image)
        .args([
            "sh",
            "-c",
            "cat /data/from-host /ro/fixed /copy/copied; \
             echo guest wrote this > /data/from-guest && echo written; \
             echo changed > /ro/fixed 2>/dev/null || echo ro-refused; \
             touch /ro/new 2>/dev/null || echo ro-refused; \
             echo kept > /copy/new && echo copy-written",
        ]);
    let out = run(cmd);
    assert_status(&out, 0);
    assert_eq!(
        stdout_of(&out),
        "host wrote this\nread-only\ncopied in\nwritten\nro-refused\nro-refused\ncopy-written\n",
        "{}",
        describe(&out)
    );
    assert_eq!(
        std::fs::read_to_string(data.join("from-guest")).unwrap(),
        "guest wrote this\n"
    );
    assert_eq!(
        std::fs::read_to_string(ro.join("fixed")).unwrap(),
        "read-only\n"
    );
    assert!(!ro.join("new").exists());
    assert!(!copy.join("new").exists(), "a :copy volume wrote back");
    assert_eq!(backends_under(&dir), Vec::<String>::new());

    // A front end killed outright takes its back end (and VMM) with it.
    let mut cmd = hearth(&dir);
    cmd.args(["container", "run", "-v"])
        .arg(format!("{}:/data", data.display()))
        .arg(&image)
        .args(["sh", "-c", "echo up > /data/up; exec sleep 600"]);
    let running = common::Running::start(cmd, std::process::Stdio::null());
    let deadline = Instant::now() + MINIMAL_TIMEOUT;
    while !data.join("up").exists() {
        assert!(Instant::now() < deadline, "{}", running.describe_so_far());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!backends_under(&dir).is_empty());
    running.signal(libc::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !backends_under(&dir).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(backends_under(&dir), Vec::<String>::new());
    let _ = running.finish(Duration::from_secs(10));
}

/// A machine shares a folder; two containers bind places under it and see each
/// other's writes (and the host sees both); a folder outside it is refused; `machine
/// stop` leaves no back end.
#[test]
fn a_machine_shares_a_folder_with_its_containers() {
    if !shares_possible() {
        return;
    }
    let dir = scratch("machine");
    let image = dir.join("busybox-oci");
    sample::busybox_oci_layout(&image, &[]).expect("build the busybox OCI layout");
    let home = dir.join("home");
    let proj = home.join("proj");
    std::fs::create_dir_all(&proj).unwrap();
    let outside = dir.join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let name = format!("v{}", std::process::id());
    let guard = MachineGuard {
        state: dir.join("state"),
        name: name.clone(),
    };
    let mut start = hearth(&dir);
    start
        .args(["machine", "start", &name, "--memory", "384M", "--share"])
        .arg(&home);
    assert_status(&run(start), 0);

    // The machine sees the folder at the host's path.
    let home_text = std::fs::canonicalize(&home).unwrap().display().to_string();
    std::fs::write(home.join("hello"), "from the host\n").unwrap();
    let mut cmd = hearth(&dir);
    cmd.args(["machine", "run", &name, "--", "cat"])
        .arg(format!("{home_text}/hello"));
    let out = run(cmd);
    assert_status(&out, 0);
    assert_eq!(stdout_of(&out), "from the host\n");

    let container = |script: &str| {
        let mut cmd = hearth(&dir);
        cmd.args(["container", "run", "--machine", &name, "-v"])
            .arg(format!("{}:/src", proj.display()))
            .arg(&image)
            .args(["sh", "-c", script]);
        run(cmd)
    };
    let out = container("echo a > /src/a && echo a-done");
    assert_status(&out, 0);
    assert_eq!(stdout_of(&out), "a-done\n");
    let out = container("cat /src/a && echo b > /src/b");
    assert_status(&out, 0);
    assert_eq!(stdout_of(&out), "a\n");
    assert_eq!(std::fs::read_to_string(proj.join("a")).unwrap(), "a\n");
    assert_eq!(std::fs::read_to_string(proj.join("b")).unwrap(), "b\n");

    // A folder the machine does not share is refused before anything runs.
    let mut cmd = hearth(&dir);
    cmd.args(["container", "run", "--machine", &name, "-v"])
        .arg(format!("{}:/x", outside.display()))
        .arg(&image)
        .arg("true");
    let out = run(cmd);
    assert_status(&out, 125);
    let stderr = stderr_of(&out);
    assert_eq!(stderr.lines().count(), 1, "{}", describe(&out));
    assert!(stderr.contains("does not share it"), "{}", describe(&out));

    // `machine list` shows the share.
    let mut cmd = hearth(&dir);
    cmd.args(["machine", "list"]);
    let out = run(cmd);
    assert!(stdout_of(&out).contains(&home_text), "{}", describe(&out));

    assert!(!backends_under(&dir).is_empty());
    let mut cmd = hearth(&dir);
    cmd.args(["machine", "stop", &name]);
    assert_status(&run(cmd), 0);
    std::mem::forget(guard);
    assert_eq!(backends_under(&dir), Vec::<String>::new());
}

/// Folders that are missing or not directories fail before anything boots, with one
/// line; so does a machine's container asking for a copy.
#[test]
fn bad_shared_folders_fail_before_boot() {
    let dir = scratch("bad");
    let file = dir.join("file");
    std::fs::write(&file, "x").unwrap();
    let missing = dir.join("missing");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "container".into(),
                "run".into(),
                "-v".into(),
                format!("{}:/x", missing.display()),
                "/tmp".into(),
                "true".into(),
            ],
            "does not exist",
        ),
        (
            vec![
                "machine".into(),
                "start".into(),
                "m".into(),
                "--share".into(),
                missing.display().to_string(),
            ],
            "does not exist",
        ),
        (
            vec![
                "machine".into(),
                "start".into(),
                "m".into(),
                "--share".into(),
                file.display().to_string(),
            ],
            "is not a directory",
        ),
        (
            vec![
                "container".into(),
                "run".into(),
                "-v".into(),
                format!("{}:/x:copy", file.display()),
                "/tmp".into(),
                "true".into(),
            ],
            "copy applies to a directory",
        ),
    ];
    for (args, expected) in cases {
        let mut cmd = hearth(&dir);
        cmd.args(&args);
        let out = run(cmd);
        assert_status(&out, 125);
        let stderr = stderr_of(&out);
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {}", describe(&out));
        assert!(stderr.contains(expected), "{args:?}: {}", describe(&out));
    }
    assert!(!dir.join("state/machines/m/console.log").exists());
}
