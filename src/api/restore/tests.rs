use std::path::Path;

use clap::Parser;

use super::*;
use crate::api::{channel, ActionResult};
use crate::cli::{Cli, Command};

fn args(argv: &[&str]) -> Result<RestoreArgs, clap::Error> {
    let cli = Cli::try_parse_from(["hearth", "restore"].iter().chain(argv))?;
    cli.check()?;
    let Some(Command::Restore(args)) = cli.command else {
        panic!("expected restore");
    };
    Ok(args)
}

fn plan(argv: &[&str]) -> Result<RestorePlan, RestoreError> {
    let mut full = vec!["--state", "/snap/vm.state", "--mem", "/snap/vm.mem"];
    full.extend(argv);
    args(&full).unwrap().plan()
}

#[test]
fn a_plain_restore_is_one_load_that_resumes() {
    let plan = plan(&[]).unwrap();
    assert_eq!(plan.load.snapshot_path, Path::new("/snap/vm.state"));
    assert_eq!(
        plan.load.memory().unwrap(),
        MemoryBackend {
            backend_type: MemoryBackendType::File,
            backend_path: "/snap/vm.mem".into()
        }
    );
    assert!(plan.load.resume_vm);
    assert!(plan.load.network_overrides.is_empty() && plan.load.vsock_override.is_none());
    assert_eq!(plan.actions(), [VmmAction::LoadSnapshot(plan.load.clone())]);
    // What a Firecracker client would send.
    assert_eq!(
        serde_json::to_value(&plan.load).unwrap(),
        serde_json::json!({
            "snapshot_path": "/snap/vm.state",
            "mem_backend": {"backend_type": "File", "backend_path": "/snap/vm.mem"},
            "enable_diff_snapshots": false,
            "track_dirty_pages": false,
            "resume_vm": true,
            "network_overrides": [],
            "clock_realtime": false
        })
    );
}

#[test]
fn overrides_become_firecrackers_requests() {
    let plan = plan(&[
        "--net-override",
        "eth0=tap7",
        "--net-override",
        "net_1=tap=odd",
        "--net-override",
        "net2=a=b",
        "--net-override",
        "net3=user,ports=127.0.0.1:8080:80",
        "--net-override",
        "net4=stream=/run/p.sock",
        "--vsock-override",
        "/run/v.sock",
        "--disk-override",
        "rootfs=/images/a=b.img",
        "--disk-override",
        "data=relative.img",
        "--fs-override",
        "hostshare=/run/fs.sock",
    ])
    .unwrap();
    assert_eq!(
        plan.load.network_overrides,
        [
            NetworkOverride::new("eth0", NetBackend::Tap("tap7".into())),
            // Split at the first '=': the rest is the tap's name, or a back end spec.
            NetworkOverride::new("net_1", NetBackend::Tap("odd".into())),
            NetworkOverride::new("net2", NetBackend::Tap("a=b".into())),
            NetworkOverride::new(
                "net3",
                NetBackend::User(crate::devices::virtio::net::UserNetConfig {
                    ports: vec!["127.0.0.1:8080:80".parse().unwrap()]
                })
            ),
            NetworkOverride::new("net4", NetBackend::Stream("/run/p.sock".into()))
        ]
    );
    assert_eq!(
        plan.load.vsock_override,
        Some(VsockOverride {
            uds_path: "/run/v.sock".into()
        })
    );
    // The drives are opened in place of the saved ones at the load, which resumes.
    assert!(plan.load.resume_vm);
    let drives = &plan.load.drive_overrides;
    assert_eq!(drives[0].drive_id, "rootfs");
    assert_eq!(drives[0].path_on_host, Path::new("/images/a=b.img"));
    assert_eq!(drives[1].drive_id, "data");
    assert!(drives[1].path_on_host.is_absolute());
    assert!(drives[1].path_on_host.ends_with("relative.img"));
    assert_eq!(
        plan.load.fs_overrides,
        [FsOverride {
            tag: "hostshare".into(),
            socket: "/run/fs.sock".into()
        }]
    );
    let actions = plan.actions();
    assert_eq!(actions.len(), 1);
    assert!(matches!(&actions[0], VmmAction::LoadSnapshot(_)));
}

#[test]
fn paused_restores_do_not_resume() {
    let paused = plan(&["--api-sock", "/run/a.sock", "--paused"]).unwrap();
    assert!(!paused.load.resume_vm);
    let with_disk = plan(&["--api-sock", "a", "--paused", "--disk-override", "d=x"]).unwrap();
    assert!(!with_disk.load.resume_vm);
    assert_eq!(with_disk.actions().len(), 1);
}

#[test]
fn malformed_overrides_are_one_line_naming_the_value() {
    for (argv, expected) in [
        (
            &["--net-override", "eth0"][..],
            "invalid --net-override \"eth0\": expected IFACE=TAP",
        ),
        (
            &["--net-override", "=tap0"],
            "invalid --net-override \"=tap0\": the interface id is empty",
        ),
        (
            &["--net-override", "eth-0=tap0"],
            "invalid --net-override \"eth-0=tap0\": interface id \"eth-0\" may hold only \
             letters, digits and '_'",
        ),
        (
            &["--net-override", "eth0="],
            "invalid --net-override \"eth0=\": \"\" is not a tap name (1 to 15 printable \
             characters without '/' or ':')",
        ),
        (
            &["--net-override", "eth0=a-very-long-tap-name"],
            "invalid --net-override \"eth0=a-very-long-tap-name\": \"a-very-long-tap-name\" \
             is not a tap name (1 to 15 printable characters without '/' or ':')",
        ),
        (
            &["--net-override", "eth0=user,mac=52:54:00:00:00:01"],
            "invalid --net-override \"eth0=user,mac=52:54:00:00:00:01\": only the back end \
             (tap=, stream= or user) can be changed",
        ),
        (
            &["--net-override", "eth0=user,ports=1:2+1:3"],
            "invalid --net-override \"eth0=user,ports=1:2+1:3\": host port 1/tcp is published twice",
        ),
        (
            &["--net-override", "eth0=t1", "--net-override", "eth0=t2"],
            "--net-override names \"eth0\" twice",
        ),
        (
            &["--disk-override", "/images/root.img"],
            "invalid --disk-override \"/images/root.img\": expected ID=PATH",
        ),
        (
            &["--disk-override", "rootfs="],
            "invalid --disk-override \"rootfs=\": the image path is empty",
        ),
        (
            &["--disk-override", "root fs=/x"],
            "invalid --disk-override \"root fs=/x\": drive id \"root fs\" may hold only \
             letters, digits and '_'",
        ),
        (
            &["--disk-override", "d=/a", "--disk-override", "d=/b"],
            "--disk-override names \"d\" twice",
        ),
        (
            &["--fs-override", "share"],
            "invalid --fs-override \"share\": expected TAG=PATH",
        ),
        (
            &["--fs-override", "=/s"],
            "invalid --fs-override \"=/s\": virtio-fs tag is empty",
        ),
        (
            &["--fs-override", "share="],
            "invalid --fs-override \"share=\": the socket path is empty",
        ),
        (
            &["--fs-override", "s=/a", "--fs-override", "s=/b"],
            "--fs-override names \"s\" twice",
        ),
    ] {
        let err = plan(argv).unwrap_err();
        let text = crate::error_chain(&err);
        assert_eq!(text, expected, "{argv:?}");
        assert!(!text.contains('\n'));
    }
}

#[test]
fn the_command_line_needs_both_files_and_paused_needs_a_socket() {
    use clap::error::ErrorKind;
    for (argv, kind) in [
        (&["--state", "s"][..], ErrorKind::MissingRequiredArgument),
        (&["--mem", "m"], ErrorKind::MissingRequiredArgument),
        (
            &["--state", "s", "--mem", "m", "--paused"],
            ErrorKind::MissingRequiredArgument,
        ),
        (
            &["--state", "s", "--mem", "m", "--vsock-override", ""],
            ErrorKind::InvalidValue,
        ),
        // A paused VM's vCPUs run only when a client resumes it: nothing to time.
        (
            &[
                "--state",
                "s",
                "--mem",
                "m",
                "--api-sock",
                "a",
                "--paused",
                "--restore-timer",
            ],
            ErrorKind::ArgumentConflict,
        ),
    ] {
        assert_eq!(args(argv).unwrap_err().kind(), kind, "{argv:?}");
    }
    let parsed = args(&[
        "--state",
        "s",
        "--mem",
        "m",
        "--api-sock",
        "/run/a.sock",
        "--paused",
        "--net-override",
        "a=b",
        "--disk-override",
        "c=d",
        "--disk-override",
        "e=f",
    ])
    .unwrap();
    assert_eq!(parsed.api_sock.as_deref(), Some(Path::new("/run/a.sock")));
    assert!(parsed.paused && !parsed.restore_timer);
    assert!(
        args(&["--state", "s", "--mem", "m", "--restore-timer"])
            .unwrap()
            .restore_timer
    );
    assert_eq!(parsed.net_overrides, ["a=b"]);
    assert_eq!(parsed.disk_overrides, ["c=d", "e=f"]);
}

/// Drives the plan against a stand-in VMM thread that answers with `answer` and records
/// every action it receives.
fn drive_against(
    plan: &RestorePlan,
    answer: fn(&VmmAction) -> ActionResult,
) -> (Result<(), RestoreError>, Vec<VmmAction>) {
    let (sender, endpoint) = channel().unwrap();
    let vmm = std::thread::spawn(move || {
        let mut seen = Vec::new();
        while let Ok(request) = endpoint.requests.recv() {
            let _ = request.reply.send(answer(&request.action));
            seen.push(request.action);
        }
        seen
    });
    let result = drive(plan, &sender);
    drop(sender);
    (result, vmm.join().unwrap())
}

#[test]
fn the_driver_sends_the_plan_and_shuts_down_after_a_refusal() {
    use crate::api::VmmData;

    let plan = plan(&["--disk-override", "rootfs=/new.img"]).unwrap();
    let (result, seen) = drive_against(&plan, |_| Ok(VmmData::Empty));
    result.unwrap();
    assert_eq!(seen, plan.actions());

    // The load is refused: nothing else is sent but the shutdown of the empty VMM, and
    // the refusal is the error.
    let (result, seen) = drive_against(&plan, |action| match action {
        VmmAction::LoadSnapshot(_) => Err(ApiError::Snapshot(
            "checksum mismatch: the file is corrupt".into(),
        )),
        _ => Ok(VmmData::Empty),
    });
    assert_eq!(
        crate::error_chain(&result.unwrap_err()),
        "cannot load the snapshot: checksum mismatch: the file is corrupt"
    );
    assert_eq!(seen, [plan.actions()[0].clone(), VmmAction::Shutdown]);
    assert!(!RestoreError::Load(ApiError::invalid("x")).vmm_gone());

    // A VMM that stopped (a signal) is not the restore's failure.
    let (result, _) = drive_against(&plan, |_| Err(ApiError::VmmGone));
    assert!(result.unwrap_err().vmm_gone());
}
