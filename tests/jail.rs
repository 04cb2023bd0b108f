//! `hearth run --jail`: a jailed VMM boots a Linux guest with a disk and a NIC; while it
//! runs, the host looks at the jailed process (the parent's only child, PID 1 of its own
//! PID namespace): its root holds only the jail's files, its mounts are only the jail's,
//! it runs as the given uid/gid with no capabilities and no_new_privs, and the API socket
//! is reachable at the path asked for. Afterwards the jail directory, the socket link and
//! the cgroup are gone. Bad jail options are one-line errors; SIGTERM reaches the jailed
//! VMM through the parent, and the exit status (and the metrics) come back.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::linux::{initramfs, linux_args, make_ext4_image, minimal_guest, Initramfs};
use common::netns::{net_tests_possible, NetNs};
use common::{
    announce_skip, assert_exit_code, describe, kvm_available, payload, run_with_timeout, stderr_of,
    stdout_of, Format, Need, Running, TempDir, HEARTH,
};

const UID: u32 = 4242;
const GID: u32 = 4343;
const HOST_IP: &str = "169.254.78.1";
const GUEST_IP: &str = "169.254.78.2";

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The jailed VMM: the only child of the `hearth` we started, once it has dropped to
/// `uid` (the jail is then complete).
fn jailed_child(parent: u32, uid: u32) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let children = fs::read_to_string(format!("/proc/{parent}/task/{parent}/children"))
            .unwrap_or_default();
        if let Some(child) = children.split_whitespace().next() {
            let child: u32 = child.parse().unwrap();
            let status = fs::read_to_string(format!("/proc/{child}/status")).unwrap_or_default();
            if field(&status, "Uid:").starts_with(&uid.to_string()) {
                return child;
            }
        }
        assert!(Instant::now() < deadline, "no jailed child of {parent}");
        thread::sleep(Duration::from_millis(20));
    }
}

fn field<'a>(status: &'a str, name: &str) -> &'a str {
    (status.lines())
        .find_map(|l| l.strip_prefix(name))
        .map(str::trim)
        .unwrap_or("")
}

/// Every path under `root` (as the jailed process sees it), not descending into /proc.
fn walk(root: &Path, dir: &Path, out: &mut BTreeSet<PathBuf>) {
    for entry in fs::read_dir(root.join(dir.strip_prefix("/").unwrap())).unwrap() {
        let entry = entry.unwrap();
        let path = dir.join(entry.file_name());
        out.insert(path.clone());
        if entry.file_type().unwrap().is_dir() && path != Path::new("/proc") {
            walk(root, &path, out);
        }
    }
}

/// `path` and its ancestors (without `/`).
fn with_ancestors(path: &Path) -> Vec<PathBuf> {
    (path.ancestors())
        .filter(|p| *p != Path::new("/"))
        .map(Path::to_path_buf)
        .collect()
}

#[test]
fn jailed_linux_guest_with_a_disk_and_a_nic() {
    if !net_tests_possible() {
        return;
    }
    if Command::new("mkfs.ext4").arg("-V").output().is_err() {
        announce_skip(Need::Tools, "mkfs.ext4 missing (install e2fsprogs)");
        return;
    }
    let ns = NetNs::new("hearth-jailtest-");
    ns.add_tap("tap0", &format!("{HOST_IP}/24"));
    let dir = TempDir::new("jail-linux");
    let disk = make_ext4_image(dir.path(), "data", 16, &[("greeting.txt", "hello jail\n")]);
    std::os::unix::fs::chown(&disk, Some(UID), Some(GID)).unwrap();
    let sockets = TempDir::short("jail-sock");
    let api_sock = sockets.join("api.sock");
    let id = format!("jailtest-{}", std::process::id());
    let jail_dir = PathBuf::from("/run/hearth/jail").join(&id);

    let command = format!(
        concat!(
            r#"sh -c "mkdir -p /mnt/d; mount -t ext4 /dev/vda /mnt/d && cat /mnt/d/greeting.txt "#,
            r#"&& echo from-the-guest > /mnt/d/out.txt && umount /mnt/d; "#,
            r#"ip link set eth0 up && ip addr add {guest}/24 dev eth0 "#,
            r#"&& ping -c 2 -W 60 {host} && echo PING-OK; sync; poweroff -f; exit 9""#
        ),
        guest = GUEST_IP,
        host = HOST_IP,
    );
    let disk_spec = format!("path={}", disk.display());
    let netns = format!("/run/netns/{}", ns.name());
    let guest = minimal_guest();
    let args = linux_args(
        &guest,
        &command,
        &[
            "--log-level",
            "info",
            "--memory",
            "128M",
            "--disk",
            &disk_spec,
            "--net",
            "tap=tap0",
            "--api-sock",
            api_sock.to_str().unwrap(),
            "--jail",
            "--jail-id",
            &id,
            "--uid",
            &UID.to_string(),
            "--gid",
            &GID.to_string(),
            "--netns",
            &netns,
            "--cgroup",
            "pids=256",
        ],
    );
    let mut cmd = Command::new(HEARTH);
    cmd.args(&args);
    let running = Running::start(cmd, Stdio::null());
    let child = jailed_child(running.pid(), UID);

    // Credentials.
    let status = fs::read_to_string(format!("/proc/{child}/status")).unwrap();
    assert_eq!(
        field(&status, "Uid:"),
        format!("{UID}\t{UID}\t{UID}\t{UID}")
    );
    assert_eq!(
        field(&status, "Gid:"),
        format!("{GID}\t{GID}\t{GID}\t{GID}")
    );
    assert_eq!(field(&status, "Groups:"), "");
    for caps in ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"] {
        assert_eq!(field(&status, caps), "0000000000000000", "{caps}");
    }
    assert_eq!(field(&status, "NoNewPrivs:"), "1");
    // Once the guest runs, every thread of the jailed VMM is under its seccomp filter.
    common::wait_for_seccomp(child, "2", &["vcpu0", "api"], || running.describe_so_far());

    // The files: only what this VM needs, at their own paths, and the jail's devices.
    let kernel = guest.kernel.canonicalize().unwrap();
    let initrd = initramfs(Initramfs::Plain).canonicalize().unwrap();
    let disk = disk.canonicalize().unwrap();
    let sock_dir = sockets.path().canonicalize().unwrap();
    let mut expected: BTreeSet<PathBuf> = [
        "/dev",
        "/dev/kvm",
        "/dev/net",
        "/dev/net/tun",
        "/dev/urandom",
        "/dev/null",
        "/proc",
    ]
    .iter()
    .map(PathBuf::from)
    .collect();
    for path in [&kernel, &initrd, &disk, &sock_dir.join("api.sock")] {
        expected.extend(with_ancestors(path));
    }
    let root = PathBuf::from(format!("/proc/{child}/root"));
    let mut seen = BTreeSet::new();
    walk(&root, Path::new("/"), &mut seen);
    // The API socket appears once the VMM has bound it; everything else is there already.
    seen.insert(sock_dir.join("api.sock"));
    assert_eq!(seen, expected, "the jail holds other files");

    // Mounts: a tmpfs as /, its /dev and /proc, each file, the socket directory (the
    // jail directory's copy of it on the host).
    let mountinfo = fs::read_to_string(format!("/proc/{child}/mountinfo")).unwrap();
    // (root within its file system, mount point, file system type)
    let mounts: Vec<(String, String, String)> = (mountinfo.lines())
        .map(|line| {
            let (left, right) = line.split_once(" - ").unwrap();
            let fields: Vec<&str> = left.split(' ').collect();
            let fstype = right.split(' ').next().unwrap();
            (fields[3].into(), fields[4].into(), fstype.into())
        })
        .collect();
    let mount_points: BTreeSet<&str> = mounts.iter().map(|(_, point, _)| point.as_str()).collect();
    let wanted: BTreeSet<&str> = [
        "/",
        "/dev",
        "/proc",
        kernel.to_str().unwrap(),
        initrd.to_str().unwrap(),
        disk.to_str().unwrap(),
        sock_dir.to_str().unwrap(),
    ]
    .into();
    assert_eq!(mount_points, wanted, "{mountinfo}");
    let fstype = |point: &str| {
        (mounts.iter())
            .find(|(_, p, _)| p == point)
            .map(|(_, _, t)| t.as_str())
    };
    assert_eq!(fstype("/"), Some("tmpfs"), "{mountinfo}");
    assert_eq!(fstype("/dev"), Some("tmpfs"), "{mountinfo}");
    assert_eq!(fstype("/proc"), Some("proc"), "{mountinfo}");
    let sock_root = format!("{}{}", jail_dir.display(), sock_dir.display());
    assert!(
        mounts
            .iter()
            .any(|(root, point, _)| *root == sock_root && point == sock_dir.to_str().unwrap()),
        "the socket directory is not the jail's\n{mountinfo}"
    );
    let cgroups = fs::read_to_string(format!("/proc/{child}/cgroup")).unwrap();
    assert!(
        cgroups
            .lines()
            .any(|l| l.ends_with(&format!("/hearth/{id}"))),
        "not in the hearth/{id} cgroup\n{cgroups}"
    );

    // The API answers at the path asked for (a link into the jail).
    let deadline = Instant::now() + Duration::from_secs(30);
    while !api_sock.exists() {
        assert!(Instant::now() < deadline, "no API socket");
        thread::sleep(Duration::from_millis(50));
    }
    let (code, info) = common::api_client::call(&api_sock, "GET", "/", "");
    assert_eq!(code, 200, "{info}");
    assert_eq!(info["state"], "Running");

    let out = running.finish(guest.timeout);
    assert_exit_code(&out, 0);
    let stdout = stdout_of(&out);
    assert!(
        stdout.contains("hello jail"),
        "disk not read\n{}",
        describe(&out)
    );
    assert!(stdout.contains("PING-OK"), "no network\n{}", describe(&out));
    let lsm = fs::read_to_string("/sys/kernel/security/lsm").unwrap_or_default();
    if lsm.split(',').any(|m| m.trim() == "landlock") {
        assert!(
            stderr_of(&out).contains("Landlock ABI"),
            "Landlock not enforced\n{}",
            describe(&out)
        );
    }
    assert!(!jail_dir.exists(), "the jail directory is left behind");
    assert!(
        api_sock.symlink_metadata().is_err(),
        "the socket link is left behind"
    );
    let group = Path::new("/sys/fs/cgroup/pids/hearth").join(&id);
    assert!(!group.exists(), "the cgroup is left behind");
    assert_eq!(
        common::linux::read_from_ext4_image(&disk, "/out.txt").as_deref(),
        Some("from-the-guest\n"),
        "the guest's write is not in the image"
    );
}

/// The tiny payload that idles until it is stopped.
fn idle_args(extra: &[&str]) -> Vec<String> {
    let kernel = payload("bench_idle", Format::Pvh);
    let mut args: Vec<String> = ["run", "--kernel", kernel.to_str().unwrap()]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(["--memory", "64M", "--serial", "none", "--jail"].map(String::from));
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

#[test]
fn sigterm_reaches_the_jailed_vmm_and_its_status_comes_back() {
    if !kvm_available() {
        return;
    }
    if !is_root() {
        announce_skip(Need::Root, "the jail needs root");
        return;
    }
    let id = format!("jailterm-{}", std::process::id());
    let dir = TempDir::new("jail-term");
    let metrics = dir.join("metrics.json");
    let mut cmd = Command::new(HEARTH);
    cmd.args(idle_args(&[
        "--jail-id",
        &id,
        "--metrics-path",
        metrics.to_str().unwrap(),
    ]));
    let running = Running::start(cmd, Stdio::null());
    let child = jailed_child(running.pid(), 65534);
    let status = fs::read_to_string(format!("/proc/{child}/status")).unwrap();
    assert_eq!(
        field(&status, "NSpid:").split_whitespace().last(),
        Some("1")
    );
    running.signal(libc::SIGTERM);
    let out = running.finish(Duration::from_secs(30));
    assert_exit_code(&out, 143);
    assert!(!Path::new("/run/hearth/jail").join(&id).exists());
    // The metrics file is not in the jail: the VMM writes through the descriptor the
    // front end opened.
    let written = fs::read_to_string(&metrics).unwrap();
    let last = written.lines().last().expect("metrics written at exit");
    let json: serde_json::Value = serde_json::from_str(last).unwrap();
    assert!(json["vcpu"].is_object(), "{last}");
}

#[test]
fn bad_jail_options_are_one_line_errors() {
    if !is_root() {
        announce_skip(Need::Root, "the jail needs root");
        return;
    }
    let dir = TempDir::new("jail-bad");
    let kernel = dir.join("kernel");
    fs::write(&kernel, b"not a kernel").unwrap();
    let root_only = dir.join("root-only.img");
    fs::write(&root_only, vec![0u8; 4096]).unwrap();
    let existing = dir.join("existing-jail");
    fs::create_dir(&existing).unwrap();
    let k = kernel.to_str().unwrap();
    let disk = format!("path={}", root_only.display());
    for (n, (extra, expected)) in [
        (
            vec!["--jail-id", "a/b"],
            "hearth: invalid --jail-id \"a/b\": use 1 to 64 of A-Z a-z 0-9 - _",
        ),
        (
            vec!["--cgroup", "cpu=-1"],
            "hearth: invalid --cgroup \"cpu=-1\": cpu \"-1\" is not a CPU count (0.01-1024)",
        ),
        (
            vec!["--rlimit", "nproc=1"],
            "hearth: invalid --rlimit \"nproc=1\": unknown option \"nproc\" (expected nofile, fsize)",
        ),
        (
            vec!["--jail-dir", existing.to_str().unwrap()],
            &format!(
                "hearth: jail directory \"{}\" exists (another VM's, or left over): remove it \
                 or choose another --jail-id",
                existing.display()
            ),
        ),
        (
            vec!["--netns", "/nonexistent/ns"],
            "hearth: cannot join network namespace \"/nonexistent/ns\": No such file or \
             directory (os error 2)",
        ),
        (
            vec!["--uid", "4242", "--disk", &disk],
            &format!(
                "hearth: uid 4242/gid 65534 cannot read and write \"{}\" (chown it, or choose \
                 --uid/--gid): Permission denied (os error 13)",
                root_only.display()
            ),
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let id = format!("jailbad-{}-{n}", std::process::id());
        let mut args = vec!["run", "--kernel", k, "--serial", "none", "--jail"];
        if !extra.contains(&"--jail-id") {
            args.extend(["--jail-id", &id]);
        }
        args.extend(&extra);
        let mut cmd = Command::new(HEARTH);
        cmd.args(&args);
        let out = run_with_timeout(cmd, Duration::from_secs(30));
        assert_exit_code(&out, 1);
        assert_eq!(stderr_of(&out).trim_end(), expected, "{extra:?}");
        assert!(
            !Path::new("/run/hearth/jail").join(&id).exists(),
            "{extra:?} left its jail behind"
        );
    }
    assert!(existing.exists(), "an existing directory was touched");
}

/// `hearth restore --jail`: the state and memory files are mounted (not copied) into the
/// jail, the restored VM runs there, and its API answers at the path asked for.
#[test]
fn a_snapshot_restores_into_a_jail() {
    if !kvm_available() {
        return;
    }
    if !is_root() {
        announce_skip(Need::Root, "the jail needs root");
        return;
    }
    let dir = TempDir::short("jail-restore");
    let source_sock = dir.join("source.sock");
    let mut args = idle_args(&["--api-sock", source_sock.to_str().unwrap()]);
    args.retain(|a| a != "--jail");
    let mut cmd = Command::new(HEARTH);
    cmd.args(&args);
    let source = Running::start(cmd, Stdio::null());
    let remote = |sock: &Path, what: &[&str]| {
        let mut cmd = Command::new(HEARTH);
        cmd.args(["remote", "--api-sock", sock.to_str().unwrap()])
            .args(what);
        run_with_timeout(cmd, Duration::from_secs(60))
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !source_sock.exists() {
        assert!(Instant::now() < deadline, "no API socket");
        thread::sleep(Duration::from_millis(20));
    }
    let (state, mem) = (dir.join("vm.state"), dir.join("vm.mem"));
    assert_exit_code(&remote(&source_sock, &["pause"]), 0);
    let snap = [
        "snapshot",
        "--state",
        state.to_str().unwrap(),
        "--mem",
        mem.to_str().unwrap(),
    ];
    assert_exit_code(&remote(&source_sock, &snap), 0);
    source.signal(libc::SIGTERM);
    source.finish(Duration::from_secs(30));

    let api_sock = dir.join("restored.sock");
    let mut cmd = Command::new(HEARTH);
    cmd.args(["restore", "--state", state.to_str().unwrap()])
        .args(["--mem", mem.to_str().unwrap()])
        .args(["--api-sock", api_sock.to_str().unwrap(), "--jail"]);
    let restored = Running::start(cmd, Stdio::null());
    let child = jailed_child(restored.pid(), 65534);
    let mountinfo = fs::read_to_string(format!("/proc/{child}/mountinfo")).unwrap();
    for file in [&state, &mem] {
        let file = file.canonicalize().unwrap();
        let line = format!(" {} {} ", file.display(), file.display());
        assert!(
            mountinfo.contains(&line),
            "{} not mounted\n{mountinfo}",
            file.display()
        );
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while !api_sock.exists() {
        assert!(Instant::now() < deadline, "no API socket");
        thread::sleep(Duration::from_millis(20));
    }
    // The API answers from the moment its socket exists, the load of the snapshot may
    // still be under way ("Not started").
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (code, info) = common::api_client::call(&api_sock, "GET", "/", "");
        assert_eq!(code, 200, "{info}");
        if info["state"] == "Running" {
            break;
        }
        assert_eq!(info["state"], "Not started", "{info}");
        assert!(
            Instant::now() < deadline,
            "the restored VM never ran: {info}"
        );
        thread::sleep(Duration::from_millis(50));
    }
    restored.signal(libc::SIGTERM);
    let out = restored.finish(Duration::from_secs(30));
    assert_exit_code(&out, 143);
    assert!(
        api_sock.symlink_metadata().is_err(),
        "the socket link is left behind"
    );
}
