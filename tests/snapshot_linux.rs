//! Snapshots of a Linux guest. In process: a guest that has mounted a virtio-blk disk is
//! paused and snapshotted in the middle of a command, and a VM restored from the snapshot
//! finishes the command through the restored devices (reading and writing the disk), with
//! its vsock device moved to a new socket; the guest's vmgenid driver has bound the VM
//! generation ID device, and the restored guest takes the GED interrupt that announces
//! the new ID. Through the binaries: a booted guest serving commands over vsock
//! (tests/programs/vsock_exec.c) is snapshotted with `hearth remote`, its VMM killed, and
//! `hearth restore` brings it back in a new process whose vsock socket has moved; a
//! command sent through that socket runs in the guest and reads the disk. Needs the
//! minimal guest kernel (see tests/common/linux.rs), e2fsprogs and a C compiler with
//! static glibc.

mod common;

use std::fs;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use clap::Parser as _;
use hearth::config::{RestoreConfig, SerialConfig};
use hearth::exit::ExitReason;

use common::linux::{linux_args, make_ext4_image, minimal_guest, read_from_ext4_image};
use common::{kvm_available, TempDir};

#[test]
fn a_restored_linux_guest_finishes_its_disk_io() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("snapshot-linux");
    let disk = make_ext4_image(dir.path(), "data", 32, &[("greeting.txt", "hello disk\n")]);
    let log = dir.join("console.log");
    let (state, mem) = (dir.join("vm.state"), dir.join("vm.mem"));
    // The guest is paused during the sleep; only the restored VM reads the file (so the
    // read goes through the restored virtio-blk device, not the page cache) and writes.
    // The markers are computed so the kernel's echo of its command line does not hold them.
    // The GED's line of /proc/interrupts (named "ACPI:Ged") is printed before the pause
    // and after the restore, and the vmgenid driver's directory lists the device it bound.
    let command = concat!(
        r#"sh -c "mkdir -p /mnt/d && mount -t ext4 /dev/vda /mnt/d && "#,
        r#"ls /sys/bus/acpi/drivers/vmgenid && grep Ged /proc/interrupts && "#,
        r#"echo READY-\$((40+2)) && sleep 4 && grep Ged /proc/interrupts && "#,
        r#"cat /mnt/d/greeting.txt && echo restored > /mnt/d/after.txt && "#,
        r#"umount /mnt/d && echo DONE-\$((50+5))""#
    );
    let args = linux_args(
        &minimal_guest(),
        command,
        &[
            "--memory",
            "128M",
            "--serial",
            &format!("file={}", log.display()),
            "--disk",
            &format!("path={}", disk.display()),
            "--vsock",
            &format!("cid=3,socket={}", dir.join("v.sock").display()),
        ],
    );
    let cli = hearth::cli::Cli::try_parse_from(std::iter::once("hearth".to_string()).chain(args))
        .expect("a valid command line");
    let Some(hearth::cli::Command::Run(run)) = cli.command else {
        panic!("not a run command");
    };
    let config = run.vm_config().expect("a valid config");

    let saved = common::snapshot::snapshot_at_marker(config, &log, "READY-42", &state, &mem);
    let before = fs::read_to_string(&log).unwrap();
    assert!(!before.contains("DONE-55"), "{before}");
    assert!(
        before.contains("HRTHVGID:00"),
        "vmgenid did not bind:\n{before}"
    );
    assert!(saved.memory_data_bytes < 128 << 20);

    let restored_log = dir.join("restored.log");
    let mut restore = RestoreConfig::new(&state, &mem);
    restore.serial = SerialConfig::File(restored_log.clone());
    restore.vsock_uds_path = Some(dir.join("moved.sock"));
    restore.resume = true;
    restore.validate().expect("a valid restore config");
    let restored = thread::spawn(move || {
        let vmm = hearth::builder::build_from_snapshot(&restore, Instant::now())
            .map_err(|e| hearth::error_chain(&e))?;
        vmm.run().map_err(|e| hearth::error_chain(&e))
    });
    let reason = restored
        .join()
        .expect("the restored VM thread")
        .expect("the restored VM ran");
    let after = fs::read_to_string(&restored_log).unwrap_or_default();
    assert!(after.contains("hello disk"), "{after}");
    assert!(after.contains("DONE-55"), "{after}");
    assert_eq!(reason, ExitReason::GuestExit(0), "{after}");
    assert_eq!(ged_interrupts(&before), Some(0), "{before}");
    assert_eq!(ged_interrupts(&after), Some(1), "{after}");
    // The GED's _EVT and VGEN's ADDR ran in the guest's AML interpreter without complaint.
    for console in [&before, &after] {
        assert!(!console.contains("ACPI Error"), "{console}");
        assert!(!console.contains("ACPI BIOS Error"), "{console}");
    }
    for line in before.lines().chain(after.lines()) {
        if line.contains("ACPI:Ged") || line.contains("HRTHVGID") {
            eprintln!("guest: {line}");
        }
    }
    assert_eq!(
        read_from_ext4_image(&disk, "/after.txt").as_deref(),
        Some("restored\n")
    );
}

/// The count of GED interrupts (summed over the CPUs) in the last line of /proc/interrupts
/// on `console`, e.g. ` 23:   1   IO-APIC  23-edge   ACPI:Ged`.
fn ged_interrupts(console: &str) -> Option<u64> {
    let line = console.lines().rev().find(|l| l.contains("ACPI:Ged"))?;
    let counts = line.split_whitespace().skip(1);
    Some(counts.map_while(|field| field.parse::<u64>().ok()).sum())
}

/// tests/programs/vsock_exec.c, built static into `dir`; its bytes.
fn vsock_exec_binary(dir: &Path) -> Vec<u8> {
    let binary = dir.join("vsock_exec");
    common::build_static_program("vsock_exec", &binary);
    fs::read(&binary).expect("read vsock_exec")
}

/// `hearth remote --api-sock SOCK ARGS...`, which must succeed.
#[track_caller]
fn remote_ok(sock: &Path, args: &[&str]) {
    let mut cmd = common::hearth();
    cmd.arg("remote").arg("--api-sock").arg(sock).args(args);
    let out = common::run_with_timeout(cmd, common::RUN_TIMEOUT);
    common::assert_exit_code(&out, 0);
}

/// Waits until `log` holds `marker` while `vmm` runs.
#[track_caller]
fn wait_for_console(log: &Path, marker: &str, vmm: &mut common::Running) {
    let deadline = Instant::now() + minimal_guest().timeout;
    loop {
        let text = fs::read_to_string(log).unwrap_or_default();
        if text.contains(marker) {
            return;
        }
        assert!(
            vmm.is_running() && Instant::now() < deadline,
            "no {marker:?} on the console:\n{text}\n{}",
            vmm.describe_so_far()
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `command` in the guest through vsock_exec on guest port `port`, reached through
/// hearth's vsock socket `uds` (Firecracker's "CONNECT <port>" handshake); returns its
/// output once the guest closes the connection.
fn run_over_vsock(uds: &Path, port: u32, command: &str, vmm: &mut common::Running) -> String {
    use std::io::{BufRead, BufReader, Read, Write};

    let deadline = Instant::now() + common::RUN_TIMEOUT;
    let stream = loop {
        match hearth::uds::connect(uds) {
            Ok(stream) => break stream,
            Err(e) => {
                assert!(
                    Instant::now() < deadline && vmm.is_running(),
                    "cannot connect to {uds:?}: {e}\n{}",
                    vmm.describe_so_far()
                );
                thread::sleep(Duration::from_millis(50));
            }
        }
    };
    stream
        .set_read_timeout(Some(common::RUN_TIMEOUT))
        .expect("read timeout");
    let mut writer = stream.try_clone().expect("clone the stream");
    write!(writer, "CONNECT {port}\n{command}\n").expect("send the command");
    let mut reader = BufReader::new(stream);
    let mut answer = String::new();
    if let Err(e) = reader.read_line(&mut answer) {
        panic!("no answer to CONNECT: {e}\n{}", vmm.describe_so_far());
    }
    assert!(answer.starts_with("OK "), "handshake answered {answer:?}");
    let mut output = String::new();
    reader
        .read_to_string(&mut output)
        .expect("read the command's output");
    output
}

/// The issue's Linux round trip through the binaries: a booted guest with a disk and a
/// vsock command server is snapshotted with `hearth remote`, its VMM is killed, and
/// `hearth restore` in a new process, with the vsock socket moved, runs a command sent
/// through the new socket that reads the disk.
#[test]
fn a_linux_guest_restored_in_a_new_process_runs_a_command_over_vsock() {
    if !kvm_available() {
        return;
    }
    const PORT: u32 = 5000;
    let dir = TempDir::new("snapshot-vsock");
    let exec = vsock_exec_binary(dir.path());
    let disk = make_ext4_image(
        dir.path(),
        "data",
        32,
        &[
            ("greeting.txt", b"hello disk\n".as_slice()),
            ("vsock_exec", exec.as_slice()),
        ],
    );
    let (log, sock) = (dir.join("console.log"), dir.join("api.sock"));
    let (old_vsock, new_vsock) = (dir.join("v.sock"), dir.join("moved.sock"));
    let (state, mem) = (dir.join("vm.state"), dir.join("vm.mem"));
    let command = format!(
        "sh -c \"mkdir -p /mnt/d && mount -t ext4 /dev/vda /mnt/d && /mnt/d/vsock_exec {PORT}\""
    );
    let mut cmd = common::hearth();
    cmd.args(linux_args(
        &minimal_guest(),
        &command,
        &[
            "--memory",
            "128M",
            "--serial",
            &format!("file={}", log.display()),
            "--disk",
            &format!("path={}", disk.display()),
            "--vsock",
            &format!("cid=3,socket={}", old_vsock.display()),
            "--api-sock",
            &sock.display().to_string(),
        ],
    ));
    let mut original = common::Running::start(cmd, std::process::Stdio::null());
    wait_for_console(&log, "vsock-exec listening", &mut original);
    // The server answers before the snapshot too.
    assert_eq!(
        run_over_vsock(&old_vsock, PORT, "uname -s", &mut original),
        "Linux\n"
    );

    remote_ok(&sock, &["pause"]);
    let (state_arg, mem_arg) = (state.display().to_string(), mem.display().to_string());
    remote_ok(
        &sock,
        &["snapshot", "--state", &state_arg, "--mem", &mem_arg],
    );
    original.signal(libc::SIGKILL);
    original.finish(common::RUN_TIMEOUT);

    let restored_log = dir.join("restored.log");
    let mut cmd = common::hearth();
    cmd.args([
        "--log-level",
        "debug",
        "restore",
        "--state",
        &state_arg,
        "--mem",
        &mem_arg,
    ])
    .arg("--vsock-override")
    .arg(&new_vsock)
    .arg("--serial-out")
    .arg(&restored_log);
    let mut restored = common::Running::start(cmd, std::process::Stdio::null());
    // A connection the guest accepts before it has handled the vsock TRANSPORT_RESET of
    // the restore is reset with the old ones (the guest closes it with no output): a
    // client retries, as with Firecracker.
    let deadline = Instant::now() + minimal_guest().timeout;
    let mut attempts = 0;
    let output = loop {
        attempts += 1;
        let output = run_over_vsock(
            &new_vsock,
            PORT,
            "cat /mnt/d/greeting.txt; uname -s",
            &mut restored,
        );
        if !output.is_empty() || Instant::now() >= deadline {
            break output;
        }
        thread::sleep(Duration::from_secs(1));
    };
    eprintln!("the restored guest answered over vsock after {attempts} attempt(s)");
    assert!(restored.is_running(), "{}", restored.describe_so_far());
    assert_eq!(
        output,
        "hello disk\nLinux\n",
        "console after the restore:\n{}\n{}",
        fs::read_to_string(&restored_log).unwrap_or_default(),
        restored.describe_so_far()
    );
    restored.signal(libc::SIGTERM);
    let out = restored.finish(common::RUN_TIMEOUT);
    common::assert_exit_code(&out, 128 + libc::SIGTERM);
}
