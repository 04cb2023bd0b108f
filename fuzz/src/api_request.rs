//! `api_request`: the bytes a client sends on hearth's API socket, through the server's
//! request framing (`hearth::api::http::next_request`) and routing
//! (`hearth::api::parse::parse_request`), as the server thread runs them, and every
//! answer rendered as the server would write it.
//!
//! Input format:
//!
//! ```text
//! u8      body limit: 64 + 256 * n bytes (small, so that oversized bodies are reached)
//! u8      a split point, as a fraction of the first request's length (n / 256)
//! rest    the stream
//! ```
//!
//! Checked (beyond "no panic"):
//! - a request consumes at least one byte and no more than there is;
//! - framing does not depend on how the bytes arrive: every prefix of a request (at the
//!   chosen split point) is `Incomplete`, never a different request or an error;
//! - a body is never longer than the limit;
//! - every refusal has a non-empty fault message and status 400 or 503, and every answer
//!   renders as an HTTP/1.1 response whose `Content-Length` matches its JSON body.

use hearth::api::http::{next_request, render_response, Framing};
use hearth::api::parse::parse_request;
use hearth::api::{error_response, ApiError};

use crate::input::Input;

/// How the stream ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// Every byte was part of a whole request.
    Clean,
    /// The stream stopped inside a request.
    Incomplete,
    /// The server would answer an error and close the connection.
    Refused,
}

/// What one input did, for tests: each request's action (its `Debug` form) or fault
/// message, and how the stream ended.
#[derive(Debug, PartialEq, Eq)]
pub struct Outcome {
    pub answers: Vec<Result<String, String>>,
    pub end: End,
}

pub fn run(data: &[u8]) -> Outcome {
    let mut input = Input::new(data);
    let max_body = 64 + 256 * usize::from(input.u8());
    let split = usize::from(input.u8());
    let mut stream = input.rest();
    let mut answers = Vec::new();
    let mut first = true;
    loop {
        if stream.is_empty() {
            return Outcome {
                answers,
                end: End::Clean,
            };
        }
        match next_request(stream, max_body) {
            Ok(Framing::Incomplete { .. }) => {
                return Outcome {
                    answers,
                    end: End::Incomplete,
                }
            }
            Ok(Framing::Request { request, consumed }) => {
                assert!(
                    consumed > 0 && consumed <= stream.len(),
                    "a request of {consumed} bytes in {}",
                    stream.len()
                );
                assert!(request.body.as_ref().is_none_or(|b| b.len() <= max_body));
                if first {
                    let cut = consumed * split / 256;
                    if cut < consumed {
                        let prefix = next_request(&stream[..cut], max_body);
                        assert!(
                            matches!(prefix, Ok(Framing::Incomplete { .. })),
                            "a {cut}-byte prefix of a {consumed}-byte request gave {prefix:?}"
                        );
                    }
                    first = false;
                }
                let answer =
                    match parse_request(&request.method, &request.path, request.body.as_deref()) {
                        Ok(action) => {
                            check_rendered(&render_response(204, None, request.close), 204);
                            Ok(format!("{action:?}"))
                        }
                        Err(e) => Err(check_fault(&e, request.close)),
                    };
                answers.push(answer);
                stream = &stream[consumed..];
            }
            Err(e) => {
                answers.push(Err(check_fault(&e, true)));
                return Outcome {
                    answers,
                    end: End::Refused,
                };
            }
        }
    }
}

/// The fault message, after checking how it would be answered.
fn check_fault(err: &ApiError, close: bool) -> String {
    let message = err.to_string();
    assert!(!message.is_empty(), "an error without a message: {err:?}");
    let status = err.status();
    assert!(status == 400 || status == 503, "{err:?} answered {status}");
    let bytes = error_response(err, close);
    let body = check_rendered(&bytes, status);
    let fault: serde_json::Value = serde_json::from_slice(body).expect("the fault is JSON");
    assert_eq!(fault["fault_message"].as_str(), Some(message.as_str()));
    message
}

/// Checks the status line and that `Content-Length` covers exactly the body; returns it.
fn check_rendered(bytes: &[u8], status: u16) -> &[u8] {
    let head_end = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head")
        + 4;
    let head = std::str::from_utf8(&bytes[..head_end]).expect("a text head");
    assert!(head.starts_with(&format!("HTTP/1.1 {status} ")), "{head}");
    let body = &bytes[head_end..];
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .map(|l| l.trim().parse::<usize>().expect("a numeric length"));
    assert_eq!(length.unwrap_or(0), body.len(), "{head}");
    assert_eq!(
        status == 204,
        length.is_none(),
        "204 alone has no length: {head}"
    );
    body
}

/// Seed inputs: a client's configuration session, pipelined and HTTP/1.0 requests, an
/// interrupted body, and the refusals (oversized, chunked, garbage, bad JSON).
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    fn put(path: &str, body: &str) -> String {
        format!(
            "PUT {path} HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    }
    // Body limit 64 + 256 * 200 bytes, as Firecracker's 50 KiB; split in the middle.
    let seed = |text: String| [vec![200, 128], text.into_bytes()].concat();
    let session = [
        "GET / HTTP/1.1\r\nHost: localhost\r\n\r\n".to_string(),
        put("/machine-config", r#"{"vcpu_count": 2, "mem_size_mib": 256}"#),
        put(
            "/boot-source",
            r#"{"kernel_image_path": "/vmlinux", "boot_args": "console=ttyS0"}"#,
        ),
        put(
            "/drives/rootfs",
            r#"{"drive_id": "rootfs", "path_on_host": "/rootfs.ext4", "is_root_device": true, "is_read_only": false}"#,
        ),
        put(
            "/network-interfaces/eth0",
            r#"{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:ac:10:00:02"}"#,
        ),
        put("/vsock", r#"{"guest_cid": 3, "uds_path": "/v.sock"}"#),
        put("/actions", r#"{"action_type": "InstanceStart"}"#),
        "GET /vm/config HTTP/1.1\r\n\r\n".to_string(),
    ]
    .concat();
    vec![
        ("configuration_session", seed(session)),
        (
            "http10_keep_alive",
            seed("GET /version HTTP/1.0\r\n\r\nGET /machine-config HTTP/1.0\r\n\r\n".into()),
        ),
        (
            "patch_vm_and_drive",
            seed(
                [
                    "PATCH /vm HTTP/1.1\r\nContent-Length: 19\r\n\r\n{\"state\": \"Paused\"}".to_string(),
                    "PATCH /drives/rootfs HTTP/1.1\r\nContent-Length: 51\r\nConnection: close\r\n\r\n{\"drive_id\": \"rootfs\", \"path_on_host\": \"/new.ext4\"}".to_string(),
                ]
                .concat(),
            ),
        ),
        (
            "snapshots",
            seed(
                [
                    put("/snapshot/create", r#"{"snapshot_type": "Full", "snapshot_path": "/s", "mem_file_path": "/m"}"#),
                    put("/snapshot/load", r#"{"snapshot_path": "/s", "mem_backend": {"backend_type": "File", "backend_path": "/m"}, "resume_vm": true}"#),
                ]
                .concat(),
            ),
        ),
        (
            "expect_continue_partial_body",
            seed("PUT /vm HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 19\r\n\r\n{\"sta".into()),
        ),
        (
            "bad_json_and_unknown_path",
            seed([put("/machine-config", "{\"vcpu_count\": \"x\"}"), "DELETE /nowhere HTTP/1.1\r\n\r\n".to_string()].concat()),
        ),
        (
            "oversized_body",
            [vec![0, 128], put("/boot-source", &"x".repeat(100)).into_bytes()].concat(),
        ),
        (
            "chunked_body",
            seed("PUT /vm HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n".into()),
        ),
        ("garbage", seed("\u{16}\u{3}\u{1} hello\r\n\r\n".into())),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seed(name: &str) -> Vec<u8> {
        seeds().into_iter().find(|(n, _)| *n == name).unwrap().1
    }

    #[test]
    fn seeds_reach_their_paths() {
        let session = run(&seed("configuration_session"));
        assert_eq!(session.end, End::Clean);
        assert_eq!(session.answers.len(), 8);
        assert!(session.answers.iter().all(Result::is_ok), "{session:?}");

        let old = run(&seed("http10_keep_alive"));
        assert_eq!(
            old.answers,
            [Ok("GetVersion".into()), Ok("GetMachineConfig".into())]
        );

        let patch = run(&seed("patch_vm_and_drive"));
        assert_eq!(patch.answers[0], Ok("Pause".into()));
        assert!(matches!(&patch.answers[1], Ok(a) if a.starts_with("PatchDrive")));

        let snapshots = run(&seed("snapshots"));
        assert!(snapshots.answers.iter().all(Result::is_ok), "{snapshots:?}");

        assert_eq!(
            run(&seed("expect_continue_partial_body")).end,
            End::Incomplete
        );

        let bad = run(&seed("bad_json_and_unknown_path"));
        assert!(bad.answers.iter().all(Result::is_err) && bad.end == End::Clean);

        for refused in ["oversized_body", "chunked_body", "garbage"] {
            let outcome = run(&seed(refused));
            assert_eq!(outcome.end, End::Refused, "{refused}: {outcome:?}");
        }
    }
}
