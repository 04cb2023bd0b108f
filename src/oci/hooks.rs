//! The config's hooks, run on the host as the runtime-spec says: `path` with `args`
//! (args[0] is the program's name) and `env` only, the container's state JSON on stdin,
//! killed after `timeout` seconds.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use oci_spec::runtime::Hook;

use super::OciError;

/// Runs `hooks` in order; the first that fails (or times out) stops the rest.
pub fn run(stage: &str, hooks: &[Hook], state: &serde_json::Value) -> Result<(), OciError> {
    let input = state.to_string();
    for hook in hooks {
        run_one(hook, &input).map_err(|why| {
            OciError::Hook(format!("{stage} hook {}: {why}", hook.path().display()))
        })?;
    }
    Ok(())
}

fn run_one(hook: &Hook, input: &str) -> Result<(), String> {
    let mut command = Command::new(hook.path());
    let args = hook.args().clone().unwrap_or_default();
    if let Some((name, rest)) = args.split_first() {
        command.arg0(name).args(rest);
    }
    command.env_clear();
    for item in hook.env().iter().flatten() {
        if let Some((key, value)) = item.split_once('=') {
            command.env(key, value);
        }
    }
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = command.spawn().map_err(|e| e.to_string())?;
    if let Some(mut stdin) = child.stdin.take() {
        // A hook that does not read its stdin is no failure.
        let _ = stdin.write_all(input.as_bytes());
    }
    let deadline = hook
        .timeout()
        .filter(|&t| t > 0)
        .map(|t| Instant::now() + Duration::from_secs(t as u64));
    loop {
        match child.try_wait().map_err(|e| e.to_string())? {
            Some(status) if status.success() => return Ok(()),
            Some(status) => {
                let mut stderr = String::new();
                if let Some(mut pipe) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
                }
                let stderr = stderr.trim();
                return Err(if stderr.is_empty() {
                    format!("{status}")
                } else {
                    format!("{status}: {stderr}")
                });
            }
            None if deadline.is_some_and(|d| Instant::now() >= d) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("timed out after {} s", hook.timeout().unwrap_or(0)));
            }
            None => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook(json: &str) -> Hook {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn hooks_get_the_state_on_stdin_and_their_env_only() {
        let dir = crate::testutil::TempDir::new("oci-hooks");
        let out = dir.path().join("out");
        let script = format!(
            r#"{{"path": "/bin/sh", "args": ["sh", "-c", "cat > {0}; echo \"$X$HOME\" >> {0}"],
                "env": ["X=x"]}}"#,
            out.display()
        );
        let state = serde_json::json!({"id": "c1", "status": "created"});
        run("prestart", &[hook(&script)], &state).unwrap();
        let text = std::fs::read_to_string(&out).unwrap();
        assert_eq!(text, format!("{state}x\n"));
    }

    #[test]
    fn a_failing_hook_is_an_error_naming_it() {
        let state = serde_json::json!({});
        let fail = hook(r#"{"path": "/bin/sh", "args": ["sh", "-c", "echo boom >&2; exit 3"]}"#);
        let e = run("poststart", &[fail], &state).unwrap_err().to_string();
        assert!(
            e.starts_with("poststart hook /bin/sh: exit status: 3: boom"),
            "{e}"
        );
        let slow = hook(r#"{"path": "/bin/sleep", "args": ["sleep", "10"], "timeout": 1}"#);
        let e = run("prestart", &[slow], &state).unwrap_err().to_string();
        assert!(e.ends_with("timed out after 1 s"), "{e}");
        let missing = hook(r#"{"path": "/nonexistent/hook"}"#);
        assert!(run("prestart", &[missing], &state).is_err());
    }
}
