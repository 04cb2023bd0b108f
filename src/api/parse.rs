//! Routing: an HTTP method, path and body become a [`VmmAction`] or an [`ApiError`]. A pure
//! function of its input (no I/O, no state), so it is unit-tested by table and fuzzed
//! (`fuzz/src/api_request.rs`).

use serde::de::DeserializeOwned;

use super::action::{ApiError, VmmAction};
use super::models::{
    ActionType, Balloon, BalloonStatsUpdate, BalloonUpdate, BootSource, Drive, Entropy,
    InstanceActionInfo, Logger, MachineConfig, MachineConfigUpdate, Metrics, NetworkInterface,
    PartialDrive, PartialNetworkInterface, Serial, SnapshotCreateParams, SnapshotLoadParams, Vm,
    VmState, Vsock,
};

/// Firecracker endpoints hearth has no device or feature for, and what they are.
const NOT_IMPLEMENTED: &[(&str, &str)] = &[
    ("cpu-config", "custom CPU templates (/cpu-config)"),
    ("hotplug", "memory hot-plugging (/hotplug)"),
    ("mmds", "the microVM metadata service (/mmds)"),
    ("pmem", "persistent memory devices (/pmem)"),
];

/// hearth's one request outside Firecracker's API: stop the VMM. Firecracker has no such
/// request (its VMM ends with the guest or a signal); Cloud Hypervisor calls it
/// `PUT /api/v1/vmm.shutdown`, and hearth takes that path and meaning (no body, 204). No
/// Firecracker path starts with `/api/`, so a Firecracker client cannot send it by
/// accident, and Cloud Hypervisor's `ch-remote shutdown-vmm` works against hearth.
pub const SHUTDOWN_PATH: &str = "/api/v1/vmm.shutdown";

/// Turns one request into an action. `body` is `None` when the request has none (no
/// `Content-Length`, or zero).
pub fn parse_request(method: &str, path: &str, body: Option<&[u8]>) -> Result<VmmAction, ApiError> {
    let invalid = || ApiError::InvalidPathMethod {
        method: method.to_string(),
        path: path.to_string(),
    };
    // A query string selects nothing in this API.
    let route = path.split_once('?').map_or(path, |(route, _)| route);
    if !route.starts_with('/') {
        return Err(invalid());
    }
    if route == SHUTDOWN_PATH {
        return match (method, body) {
            ("PUT", None) => Ok(VmmAction::Shutdown),
            ("PUT", Some(_)) => Err(ApiError::BodyNotAllowed(format!("PUT {SHUTDOWN_PATH}"))),
            _ => Err(invalid()),
        };
    }
    let segments: Vec<&str> = route
        .trim_start_matches('/')
        .split_terminator('/')
        .collect();
    let (resource, id, extra) = match segments.as_slice() {
        [] => ("", None, false),
        [resource] => (*resource, None, false),
        [resource, id] => (*resource, Some(*id), false),
        [resource, id, ..] => (*resource, Some(*id), true),
    };
    if let Some((_, what)) = NOT_IMPLEMENTED.iter().find(|(name, _)| *name == resource) {
        return Err(ApiError::NotImplemented(what));
    }
    if extra {
        return Err(invalid());
    }

    match method {
        "GET" => {
            if body.is_some() {
                return Err(ApiError::BodyNotAllowed(method.to_string()));
            }
            match (resource, id) {
                ("", None) => Ok(VmmAction::GetInstanceInfo),
                ("version", None) => Ok(VmmAction::GetVersion),
                ("machine-config", None) => Ok(VmmAction::GetMachineConfig),
                ("metrics", None) => Ok(VmmAction::GetMetrics),
                ("vm", Some("config")) => Ok(VmmAction::GetFullVmConfig),
                ("balloon", None) => Ok(VmmAction::GetBalloon),
                ("balloon", Some("statistics")) => Ok(VmmAction::GetBalloonStats),
                _ => Err(invalid()),
            }
        }
        "PUT" | "PATCH" => {
            let known = matches!(
                (method, resource, id),
                (
                    "PUT",
                    "actions"
                        | "boot-source"
                        | "entropy"
                        | "logger"
                        | "metrics"
                        | "serial"
                        | "vsock",
                    None
                ) | ("PUT", "snapshot", Some("create" | "load"))
                    | ("PUT" | "PATCH", "machine-config", None)
                    | ("PUT" | "PATCH", "drives" | "network-interfaces", _)
                    | ("PATCH", "vm", None)
                    | ("PUT", "balloon", None)
                    | ("PATCH", "balloon", None | Some("statistics"))
            );
            if !known {
                return Err(invalid());
            }
            let body = body.ok_or_else(|| ApiError::MissingBody(method.to_string()))?;
            parse_with_body(method, resource, id, body)
        }
        _ => Err(invalid()),
    }
}

fn parse_with_body(
    method: &str,
    resource: &str,
    id: Option<&str>,
    body: &[u8],
) -> Result<VmmAction, ApiError> {
    let put = method == "PUT";
    Ok(match (resource, id) {
        ("actions", _) => match json::<InstanceActionInfo>(body)?.action_type {
            ActionType::InstanceStart => VmmAction::InstanceStart,
            ActionType::SendCtrlAltDel => VmmAction::SendCtrlAltDel,
            ActionType::FlushMetrics => VmmAction::FlushMetrics,
        },
        ("boot-source", _) => VmmAction::PutBootSource(json::<BootSource>(body)?),
        ("logger", _) => VmmAction::PutLogger(json::<Logger>(body)?),
        ("metrics", _) => VmmAction::PutMetrics(json::<Metrics>(body)?),
        ("serial", _) => VmmAction::PutSerial(json::<Serial>(body)?),
        ("vsock", _) => VmmAction::PutVsock(json::<Vsock>(body)?),
        ("entropy", _) => VmmAction::PutEntropy(json::<Entropy>(body)?),
        ("balloon", None) if put => VmmAction::PutBalloon(json::<Balloon>(body)?),
        ("balloon", None) => VmmAction::PatchBalloon(json::<BalloonUpdate>(body)?),
        ("balloon", _) => VmmAction::PatchBalloonStats(json::<BalloonStatsUpdate>(body)?),
        ("snapshot", Some("create")) => {
            VmmAction::CreateSnapshot(json::<SnapshotCreateParams>(body)?)
        }
        ("snapshot", _) => {
            let params = json::<SnapshotLoadParams>(body)?;
            params.memory().map_err(ApiError::invalid)?;
            VmmAction::LoadSnapshot(params)
        }
        ("machine-config", _) if put => VmmAction::PutMachineConfig(json::<MachineConfig>(body)?),
        ("machine-config", _) => {
            let update = json::<MachineConfigUpdate>(body)?;
            if update.is_empty() {
                return Err(ApiError::invalid(
                    "a PATCH /machine-config body must change at least one field",
                ));
            }
            VmmAction::PatchMachineConfig(update)
        }
        ("drives", id) => {
            let id = checked_id("drive_id", id)?;
            if put {
                let drive = json::<Drive>(body)?;
                same_id("drive_id", id, &drive.drive_id)?;
                VmmAction::PutDrive(drive)
            } else {
                let drive = json::<PartialDrive>(body)?;
                same_id("drive_id", id, &drive.drive_id)?;
                VmmAction::PatchDrive(drive)
            }
        }
        ("network-interfaces", id) => {
            let id = checked_id("iface_id", id)?;
            if put {
                let iface = json::<NetworkInterface>(body)?;
                same_id("iface_id", id, &iface.iface_id)?;
                VmmAction::PutNetworkInterface(iface)
            } else {
                let iface = json::<PartialNetworkInterface>(body)?;
                same_id("iface_id", id, &iface.iface_id)?;
                VmmAction::PatchNetworkInterface(iface)
            }
        }
        // `parse_request` only lets PATCH /vm through to here.
        _ => match json::<Vm>(body)?.state {
            VmState::Paused => VmmAction::Pause,
            VmState::Resumed => VmmAction::Resume,
        },
    })
}

fn json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    Ok(serde_json::from_slice(body)?)
}

/// Resource ids in paths: non-empty, letters, digits and '_' (Firecracker's rule).
fn checked_id<'a>(what: &'static str, id: Option<&'a str>) -> Result<&'a str, ApiError> {
    let id = id
        .filter(|id| !id.is_empty())
        .ok_or(ApiError::EmptyId(what))?;
    if !id.chars().all(|c| c == '_' || c.is_alphanumeric()) {
        return Err(ApiError::InvalidId {
            what,
            id: id.to_string(),
        });
    }
    Ok(id)
}

fn same_id(what: &'static str, path: &str, body: &str) -> Result<(), ApiError> {
    if path != body {
        return Err(ApiError::IdMismatch {
            what,
            path: path.to_string(),
            body: body.to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::models::{SnapshotType, VmState};

    fn parse(method: &str, path: &str, body: &str) -> Result<VmmAction, ApiError> {
        let body = (!body.is_empty()).then_some(body.as_bytes());
        parse_request(method, path, body)
    }

    #[test]
    fn routes_every_endpoint() {
        let drive = r#"{"drive_id": "root", "path_on_host": "/d", "is_root_device": true,
                        "is_read_only": false}"#;
        let net = r#"{"iface_id": "eth0", "host_dev_name": "tap0"}"#;
        type Check = fn(&VmmAction) -> bool;
        let table: &[(&str, &str, &str, Check)] = &[
            ("GET", "/", "", |a| *a == VmmAction::GetInstanceInfo),
            ("GET", "/version", "", |a| *a == VmmAction::GetVersion),
            ("GET", "/machine-config", "", |a| {
                *a == VmmAction::GetMachineConfig
            }),
            ("GET", "/vm/config", "", |a| {
                *a == VmmAction::GetFullVmConfig
            }),
            ("GET", "/vm/config?pretty", "", |a| {
                *a == VmmAction::GetFullVmConfig
            }),
            (
                "PUT",
                "/machine-config",
                r#"{"vcpu_count": 2, "mem_size_mib": 64}"#,
                |a| matches!(a, VmmAction::PutMachineConfig(c) if c.vcpu_count == 2),
            ),
            (
                "PATCH",
                "/machine-config",
                r#"{"mem_size_mib": 96}"#,
                |a| matches!(a, VmmAction::PatchMachineConfig(u) if u.mem_size_mib == Some(96)),
            ),
            (
                "PUT",
                "/boot-source",
                r#"{"kernel_image_path": "/k", "boot_args": "console=ttyS0"}"#,
                |a| matches!(a, VmmAction::PutBootSource(b) if b.boot_args.is_some()),
            ),
            (
                "PUT",
                "/drives/root",
                drive,
                |a| matches!(a, VmmAction::PutDrive(d) if d.is_root_device),
            ),
            (
                "PATCH",
                "/drives/root",
                r#"{"drive_id": "root", "path_on_host": "/e"}"#,
                |a| matches!(a, VmmAction::PatchDrive(d) if d.path_on_host.is_some()),
            ),
            (
                "PUT",
                "/network-interfaces/eth0",
                net,
                |a| matches!(a, VmmAction::PutNetworkInterface(n) if n.host_dev_name == "tap0"),
            ),
            (
                "PATCH",
                "/network-interfaces/eth0",
                r#"{"iface_id": "eth0"}"#,
                |a| matches!(a, VmmAction::PatchNetworkInterface(_)),
            ),
            (
                "PUT",
                "/vsock",
                r#"{"guest_cid": 3, "uds_path": "/v.sock"}"#,
                |a| matches!(a, VmmAction::PutVsock(v) if v.guest_cid == 3),
            ),
            ("PUT", "/entropy", "{}", |a| {
                *a == VmmAction::PutEntropy(Entropy::default())
            }),
            (
                "PUT",
                "/balloon",
                r#"{"amount_mib": 64, "deflate_on_oom": true, "stats_polling_interval_s": 1}"#,
                |a| {
                    matches!(a, VmmAction::PutBalloon(b)
                        if b.amount_mib == 64 && b.deflate_on_oom && b.free_page_reporting)
                },
            ),
            ("PATCH", "/balloon", r#"{"amount_mib": 32}"#, |a| {
                *a == VmmAction::PatchBalloon(BalloonUpdate { amount_mib: 32 })
            }),
            ("GET", "/balloon", "", |a| *a == VmmAction::GetBalloon),
            ("GET", "/balloon/statistics", "", |a| {
                *a == VmmAction::GetBalloonStats
            }),
            (
                "PATCH",
                "/balloon/statistics",
                r#"{"stats_polling_interval_s": 2}"#,
                |a| {
                    *a == VmmAction::PatchBalloonStats(BalloonStatsUpdate {
                        stats_polling_interval_s: 2,
                    })
                },
            ),
            (
                "PUT",
                "/entropy",
                r#"{"rate_limiter": {"bandwidth": {"size": 1000, "refill_time": 100}}}"#,
                |a| matches!(a, VmmAction::PutEntropy(e) if e.rate_limiter.is_some()),
            ),
            (
                "PUT",
                "/serial",
                r#"{"serial_out_path": "/tmp/console"}"#,
                |a| matches!(a, VmmAction::PutSerial(s) if s.serial_out_path.is_some()),
            ),
            ("PUT", "/logger", r#"{"level": "Debug"}"#, |a| {
                matches!(a, VmmAction::PutLogger(_))
            }),
            (
                "PUT",
                "/actions",
                r#"{"action_type": "InstanceStart"}"#,
                |a| *a == VmmAction::InstanceStart,
            ),
            (
                "PUT",
                "/actions",
                r#"{"action_type": "SendCtrlAltDel"}"#,
                |a| *a == VmmAction::SendCtrlAltDel,
            ),
            (
                "PUT",
                "/actions",
                r#"{"action_type": "FlushMetrics"}"#,
                |a| *a == VmmAction::FlushMetrics,
            ),
            (
                "PUT",
                "/metrics",
                r#"{"metrics_path": "/m"}"#,
                |a| matches!(a, VmmAction::PutMetrics(m) if m.metrics_path.as_os_str() == "/m"),
            ),
            ("GET", "/metrics", "", |a| *a == VmmAction::GetMetrics),
            ("PATCH", "/vm", r#"{"state": "Paused"}"#, |a| {
                *a == VmmAction::Pause
            }),
            ("PATCH", "/vm", r#"{"state": "Resumed"}"#, |a| {
                *a == VmmAction::Resume
            }),
            ("PUT", "/api/v1/vmm.shutdown", "", |a| {
                *a == VmmAction::Shutdown
            }),
            (
                "PUT",
                "/snapshot/create",
                r#"{"snapshot_type": "Diff", "snapshot_path": "/s", "mem_file_path": "/m"}"#,
                |a| matches!(a, VmmAction::CreateSnapshot(p) if p.snapshot_type == SnapshotType::Diff),
            ),
            (
                "PUT",
                "/snapshot/load",
                r#"{"snapshot_path": "/s", "mem_backend": {"backend_type": "File",
                    "backend_path": "/m"}, "resume_vm": true}"#,
                |a| matches!(a, VmmAction::LoadSnapshot(p) if p.resume_vm),
            ),
        ];
        for (method, path, body, check) in table {
            let action =
                parse(method, path, body).unwrap_or_else(|e| panic!("{method} {path}: {e}"));
            assert!(check(&action), "{method} {path} gave {action:?}");
        }
        assert_eq!(
            serde_json::to_value(VmState::Resumed).unwrap(),
            serde_json::json!("Resumed")
        );
    }

    #[test]
    fn maps_bad_requests_to_errors() {
        let drive = r#"{"drive_id": "other", "path_on_host": "/d", "is_root_device": true}"#;
        let table: &[(&str, &str, &str, &str)] = &[
            (
                "GET",
                "/nope",
                "",
                "invalid request method and/or path: GET /nope",
            ),
            (
                "POST",
                "/actions",
                "{}",
                "invalid request method and/or path",
            ),
            (
                "DELETE",
                "/drives/root",
                "",
                "invalid request method and/or path",
            ),
            (
                "GET",
                "/drives/root",
                "",
                "invalid request method and/or path",
            ),
            ("GET", "/vm/config/extra", "", "invalid request method"),
            ("GET", "relative", "", "invalid request method"),
            ("PUT", "/version", "{}", "invalid request method"),
            ("PATCH", "/boot-source", "{}", "invalid request method"),
            ("GET", "/version", "{}", "a GET request cannot have a body"),
            ("PUT", "/boot-source", "", "a PUT request needs a JSON body"),
            ("PATCH", "/vm", "", "a PATCH request needs a JSON body"),
            ("PUT", "/boot-source", "{", "invalid JSON body: EOF"),
            ("PUT", "/boot-source", "[1]", "invalid JSON body"),
            (
                "PUT",
                "/boot-source",
                r#"{"kernel_image_path": "/k", "kernel": 1}"#,
                "unknown field `kernel`",
            ),
            (
                "PUT",
                "/machine-config",
                r#"{"vcpu_count": "two", "mem_size_mib": 64}"#,
                "invalid type: string \"two\"",
            ),
            (
                "PUT",
                "/machine-config",
                r#"{"vcpu_count": 2}"#,
                "missing field `mem_size_mib`",
            ),
            (
                "PATCH",
                "/machine-config",
                "{}",
                "must change at least one field",
            ),
            (
                "PUT",
                "/drives/root",
                drive,
                "differs from the one in the body",
            ),
            (
                "PUT",
                "/drives/",
                drive,
                "the drive_id in the path is empty",
            ),
            ("PUT", "/drives/a-b", drive, "invalid drive_id \"a-b\""),
            (
                "PUT",
                "/network-interfaces/eth0",
                r#"{"iface_id": "eth1", "host_dev_name": "t"}"#,
                "the iface_id in the path",
            ),
            (
                "PUT",
                "/actions",
                r#"{"action_type": "Reboot"}"#,
                "unknown variant `Reboot`",
            ),
            (
                "PATCH",
                "/vm",
                r#"{"state": "Stopped"}"#,
                "unknown variant `Stopped`",
            ),
            (
                "PUT",
                "/snapshot/load",
                r#"{"snapshot_path": "/s"}"#,
                "mem_backend",
            ),
            ("PUT", "/snapshot/other", "{}", "invalid request method"),
            ("PUT", "/entropy", "", "a PUT request needs a JSON body"),
            ("GET", "/entropy", "", "invalid request method"),
            ("PATCH", "/entropy", "{}", "invalid request method"),
            ("PUT", "/entropy/x", "{}", "invalid request method"),
            ("PUT", "/entropy", r#"{"rate": 1}"#, "unknown field `rate`"),
            ("PUT", "/balloon", "{}", "missing field `amount_mib`"),
            ("PUT", "/balloon/statistics", "{}", "invalid request method"),
            (
                "PATCH",
                "/balloon",
                r#"{"amount_mib": -1}"#,
                "invalid value",
            ),
            (
                "PATCH",
                "/balloon",
                r#"{"amount_mib": 1, "deflate_on_oom": true}"#,
                "unknown field `deflate_on_oom`",
            ),
            (
                "PATCH",
                "/balloon/statistics",
                r#"{"stats_polling_interval_s": 70000}"#,
                "invalid value",
            ),
            ("GET", "/balloon/other", "", "invalid request method"),
            ("DELETE", "/balloon", "", "invalid request method"),
            (
                "GET",
                "/mmds",
                "",
                "hearth does not implement the microVM metadata service",
            ),
            ("PUT", "/metrics", "{}", "missing field `metrics_path`"),
            ("PUT", "/metrics", "", "a PUT request needs a JSON body"),
            ("PATCH", "/metrics", "{}", "invalid request method"),
            ("GET", "/metrics/x", "", "invalid request method"),
            ("PUT", "/boot-source", "\u{0}\u{ff}", "invalid JSON body"),
            (
                "PUT",
                "/api/v1/vmm.shutdown",
                "{}",
                "a PUT /api/v1/vmm.shutdown request cannot have a body",
            ),
            (
                "GET",
                "/api/v1/vmm.shutdown",
                "",
                "invalid request method and/or path",
            ),
            // Only the shutdown is taken from Cloud Hypervisor's API.
            ("PUT", "/api/v1/vm.pause", "", "invalid request method"),
            ("PUT", "/vmm.shutdown", "", "invalid request method"),
        ];
        for (method, path, body, expected) in table {
            let err = parse(method, path, body).expect_err(&format!("{method} {path} {body}"));
            assert_eq!(err.status(), 400);
            let text = err.to_string();
            assert!(
                text.contains(expected),
                "{method} {path} {body}: \"{text}\" lacks \"{expected}\""
            );
        }
    }
}
