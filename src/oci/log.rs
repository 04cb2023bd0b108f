//! The runtime's `--log` file. Engines read it to report a failure (containerd's shim
//! and conmon both take the last `"level":"error"` line of the JSON form), so every
//! error `hearth oci` prints on stderr is also appended here, in the chosen format.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;

use super::args::LogFormat;

/// One line of the log: runc's JSON shape (`{"level", "msg", "time"}`) or a readable
/// text line.
pub fn format_line(format: LogFormat, level: &str, message: &str, time: &str) -> String {
    match format {
        LogFormat::Json => {
            let line = serde_json::json!({"level": level, "msg": message, "time": time});
            format!("{line}\n")
        }
        LogFormat::Text => format!("{time} {level}: {message}\n"),
    }
}

/// Appends a line to `path` (created if missing). Logging never fails a command: a log
/// that cannot be written is reported on stderr once.
pub fn append(path: &Path, format: LogFormat, level: &str, message: &str) {
    let line = format_line(format, level, message, &super::state::now_rfc3339());
    let written = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = written {
        eprintln!("hearth oci: cannot write the log {}: {e}", path.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines_are_what_engines_parse() {
        let line = format_line(LogFormat::Json, "error", "a \"quoted\" thing", "T");
        assert!(line.ends_with('\n'));
        let value: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(value["level"], "error");
        assert_eq!(value["msg"], "a \"quoted\" thing");
        assert_eq!(value["time"], "T");
        assert_eq!(
            format_line(LogFormat::Text, "warning", "m", "T"),
            "T warning: m\n"
        );
    }

    #[test]
    fn lines_are_appended() {
        let dir = crate::testutil::TempDir::new("oci-log");
        let path = dir.path().join("log.json");
        append(&path, LogFormat::Json, "error", "one");
        append(&path, LogFormat::Json, "error", "two");
        let text = std::fs::read_to_string(&path).unwrap();
        let msgs: Vec<String> = text
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["msg"].to_string())
            .collect();
        assert_eq!(msgs, ["\"one\"", "\"two\""]);
        let time = serde_json::from_str::<serde_json::Value>(text.lines().next().unwrap()).unwrap()
            ["time"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(time.ends_with('Z') && time.contains('T'), "{time}");
    }
}
