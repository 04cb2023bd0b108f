//! The command line of `hearth oci`, parsed the way runc's (urfave/cli) parses it:
//! global options before the command, `--flag value` and `--flag=value`, single-dash
//! long names (`-pid-file`) too, and boolean flags that take no value.

use std::path::PathBuf;

use super::OciError;

/// Where runtime state lives when `--root` is not given.
pub const DEFAULT_ROOT: &str = "/run/hearth-oci";

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Options that come before the command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Globals {
    pub root: PathBuf,
    pub log: Option<PathBuf>,
    pub log_format: LogFormat,
    pub debug: bool,
}

impl Default for Globals {
    fn default() -> Self {
        Globals {
            root: PathBuf::from(DEFAULT_ROOT),
            log: None,
            log_format: LogFormat::Text,
            debug: false,
        }
    }
}

/// `create` and the create half of `run`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CreateArgs {
    pub id: String,
    pub bundle: PathBuf,
    pub pid_file: Option<PathBuf>,
    pub console_socket: Option<PathBuf>,
}

/// `exec`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExecArgs {
    pub id: String,
    pub process: Option<PathBuf>,
    pub tty: bool,
    pub detach: bool,
    pub pid_file: Option<PathBuf>,
    pub console_socket: Option<PathBuf>,
    pub cwd: Option<String>,
    pub env: Vec<String>,
    pub user: Option<String>,
    pub command: Vec<String>,
}

/// What `hearth oci` was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Create(CreateArgs),
    Run(CreateArgs),
    Start {
        id: String,
    },
    State {
        id: String,
    },
    Kill {
        id: String,
        signal: i32,
    },
    Delete {
        id: String,
        force: bool,
    },
    Exec(ExecArgs),
    List {
        json: bool,
        quiet: bool,
    },
    Ps {
        id: String,
        json: bool,
    },
    Features,
    Version,
    /// The hidden process that holds a container VM (see `monitor`).
    Monitor {
        id: String,
    },
    /// The hidden process whose pid engines get (see `anchor`).
    Anchor {
        id: String,
        rootfs: PathBuf,
    },
    /// The hidden process that waits on a detached `exec`.
    ExecWaiter {
        id: String,
        process: PathBuf,
    },
}

/// A parsed command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    pub globals: Globals,
    pub command: Command,
}

/// How each option of a command is spelled and whether it takes a value.
struct Flags<'a> {
    args: &'a [String],
    pos: usize,
    context: &'a str,
}

/// One option from the command line: its name (without dashes) and value, if any.
enum Item {
    Flag(String, Option<String>),
    Positional(String),
}

impl<'a> Flags<'a> {
    fn new(args: &'a [String], context: &'a str) -> Self {
        Flags {
            args,
            pos: 0,
            context,
        }
    }

    /// The next item; `takes_value` says which names read a value from the next word.
    /// After `--` or the first positional word everything is positional.
    fn next(&mut self, takes_value: &[&str]) -> Result<Option<Item>, OciError> {
        let Some(word) = self.args.get(self.pos) else {
            return Ok(None);
        };
        self.pos += 1;
        if word == "--" || !word.starts_with('-') || word == "-" {
            if word == "--" {
                return Ok(self.args.get(self.pos).map(|w| {
                    self.pos += 1;
                    Item::Positional(w.clone())
                }));
            }
            return Ok(Some(Item::Positional(word.clone())));
        }
        let name = word.trim_start_matches('-');
        let (name, inline) = match name.split_once('=') {
            Some((n, v)) => (n.to_string(), Some(v.to_string())),
            None => (name.to_string(), None),
        };
        if !takes_value.contains(&name.as_str()) {
            return Ok(Some(Item::Flag(name, inline)));
        }
        let value = match inline {
            Some(v) => v,
            None => {
                let v = self.args.get(self.pos).cloned().ok_or_else(|| {
                    OciError::Usage(format!("{}: option --{name} needs a value", self.context))
                })?;
                self.pos += 1;
                v
            }
        };
        Ok(Some(Item::Flag(name, Some(value))))
    }

    fn rest(&mut self) -> Vec<String> {
        let rest = self.args[self.pos..].to_vec();
        self.pos = self.args.len();
        rest
    }
}

fn unknown(context: &str, name: &str) -> OciError {
    OciError::Usage(format!("{context}: unknown option --{name}"))
}

/// A boolean flag's value: absent, `true` or `false` (`--detach=false`).
fn boolean(context: &str, name: &str, value: Option<String>) -> Result<bool, OciError> {
    match value.as_deref() {
        None | Some("true") => Ok(true),
        Some("false") => Ok(false),
        Some(other) => Err(OciError::Usage(format!(
            "{context}: --{name}={other}: expected true or false"
        ))),
    }
}

/// Parses the words after `hearth oci` (or after a `hearth-oci` program name).
pub fn parse(args: &[String]) -> Result<Invocation, OciError> {
    let mut globals = Globals::default();
    let mut flags = Flags::new(args, "hearth oci");
    let command = loop {
        match flags.next(&["root", "log", "log-format", "criu", "rootless"])? {
            None => return Err(OciError::Usage("hearth oci: no command given".into())),
            Some(Item::Positional(word)) => break word,
            Some(Item::Flag(name, value)) => match name.as_str() {
                "root" => globals.root = PathBuf::from(value.unwrap_or_default()),
                "log" => globals.log = value.filter(|v| !v.is_empty()).map(PathBuf::from),
                "log-format" => {
                    globals.log_format = match value.as_deref() {
                        Some("text") => LogFormat::Text,
                        Some("json") => LogFormat::Json,
                        other => {
                            return Err(OciError::Usage(format!(
                                "hearth oci: --log-format {}: expected text or json",
                                other.unwrap_or_default()
                            )))
                        }
                    }
                }
                "debug" => globals.debug = boolean("hearth oci", &name, value)?,
                // Accepted for the engines' sake; nothing here uses a cgroup manager, CRIU
                // or a rootless mode of its own.
                "systemd-cgroup" | "criu" | "rootless" => {}
                "version" | "v" => {
                    return Ok(Invocation {
                        globals,
                        command: Command::Version,
                    })
                }
                other => return Err(unknown("hearth oci", other)),
            },
        }
    };
    let rest = flags.rest();
    let command = parse_command(&command, &rest)?;
    Ok(Invocation { globals, command })
}

/// The one ID a command takes.
fn one_id(context: &str, positional: &[String]) -> Result<String, OciError> {
    match positional {
        [id] => Ok(id.clone()),
        [] => Err(OciError::Usage(format!(
            "{context}: a container ID is required"
        ))),
        _ => Err(OciError::Usage(format!(
            "{context}: expected one container ID, got {}",
            positional.len()
        ))),
    }
}

fn parse_command(command: &str, args: &[String]) -> Result<Command, OciError> {
    let context = format!("hearth oci {command}");
    let ctx = context.as_str();
    let mut flags = Flags::new(args, ctx);
    let mut positional = Vec::new();
    match command {
        "create" | "run" => {
            let mut create = CreateArgs {
                bundle: PathBuf::from("."),
                ..Default::default()
            };
            let values = ["bundle", "b", "pid-file", "console-socket", "preserve-fds"];
            while let Some(item) = flags.next(&values)? {
                match item {
                    Item::Positional(p) => positional.push(p),
                    Item::Flag(name, value) => match name.as_str() {
                        "bundle" | "b" => create.bundle = PathBuf::from(value.unwrap_or_default()),
                        "pid-file" => create.pid_file = value.map(PathBuf::from),
                        "console-socket" => create.console_socket = value.map(PathBuf::from),
                        "preserve-fds" => check_preserve_fds(ctx, value.as_deref())?,
                        // The VM has its own keyring and no pivot_root question; the
                        // notify socket has nothing to notify about.
                        "no-pivot" | "no-new-keyring" | "detach" | "d" | "keep"
                        | "no-subreaper" => {}
                        other => return Err(unknown(ctx, other)),
                    },
                }
            }
            create.id = one_id(ctx, &positional)?;
            Ok(if command == "run" {
                Command::Run(create)
            } else {
                Command::Create(create)
            })
        }
        "start" | "state" | "ps" | "__monitor" => {
            let mut json = false;
            while let Some(item) = flags.next(&["format", "f"])? {
                match item {
                    Item::Positional(p) => positional.push(p),
                    Item::Flag(name, value)
                        if command == "ps" && (name == "format" || name == "f") =>
                    {
                        json = value.as_deref() == Some("json");
                    }
                    Item::Flag(name, _) => return Err(unknown(ctx, &name)),
                }
            }
            let id = one_id(ctx, &positional)?;
            Ok(match command {
                "start" => Command::Start { id },
                "state" => Command::State { id },
                "ps" => Command::Ps { id, json },
                _ => Command::Monitor { id },
            })
        }
        "__anchor" => match args {
            [id, rootfs] => Ok(Command::Anchor {
                id: id.clone(),
                rootfs: PathBuf::from(rootfs),
            }),
            _ => Err(OciError::Usage(format!("{ctx}: expected ID ROOTFS"))),
        },
        "__exec-waiter" => match args {
            [id, process] => Ok(Command::ExecWaiter {
                id: id.clone(),
                process: PathBuf::from(process),
            }),
            _ => Err(OciError::Usage(format!("{ctx}: expected ID PROCESS-FILE"))),
        },
        "kill" => {
            while let Some(item) = flags.next(&[])? {
                match item {
                    Item::Positional(p) => positional.push(p),
                    Item::Flag(name, value) if name == "all" || name == "a" => {
                        boolean(ctx, &name, value)?;
                    }
                    Item::Flag(name, _) => return Err(unknown(ctx, &name)),
                }
            }
            let (id, signal) = match positional.as_slice() {
                [id] => (id.clone(), libc::SIGTERM),
                [id, sig] => (id.clone(), parse_signal(sig)?),
                [] => {
                    return Err(OciError::Usage(format!(
                        "{ctx}: a container ID is required"
                    )))
                }
                _ => return Err(OciError::Usage(format!("{ctx}: expected ID [SIGNAL]"))),
            };
            Ok(Command::Kill { id, signal })
        }
        "delete" => {
            let mut force = false;
            while let Some(item) = flags.next(&[])? {
                match item {
                    Item::Positional(p) => positional.push(p),
                    Item::Flag(name, value) if name == "force" || name == "f" => {
                        force = boolean(ctx, &name, value)?;
                    }
                    Item::Flag(name, _) => return Err(unknown(ctx, &name)),
                }
            }
            Ok(Command::Delete {
                id: one_id(ctx, &positional)?,
                force,
            })
        }
        "exec" => parse_exec(ctx, &mut flags).map(Command::Exec),
        "list" => {
            let (mut json, mut quiet) = (false, false);
            while let Some(item) = flags.next(&["format", "f"])? {
                match item {
                    Item::Positional(p) => {
                        return Err(OciError::Usage(format!("{ctx}: unexpected {p:?}")))
                    }
                    Item::Flag(name, value) if name == "format" || name == "f" => {
                        json = match value.as_deref() {
                            Some("json") => true,
                            Some("table") => false,
                            other => {
                                return Err(OciError::Usage(format!(
                                    "{ctx}: --format {}: expected table or json",
                                    other.unwrap_or_default()
                                )))
                            }
                        }
                    }
                    Item::Flag(name, value) if name == "quiet" || name == "q" => {
                        quiet = boolean(ctx, &name, value)?;
                    }
                    Item::Flag(name, _) => return Err(unknown(ctx, &name)),
                }
            }
            Ok(Command::List { json, quiet })
        }
        "features" => match args {
            [] => Ok(Command::Features),
            _ => Err(OciError::Usage(format!("{ctx}: takes no arguments"))),
        },
        "version" => Ok(Command::Version),
        other => Err(OciError::Usage(format!(
            "hearth oci: unknown command {other:?} (create, start, run, state, kill, delete, \
             exec, list, ps, features, --version)"
        ))),
    }
}

fn parse_exec(ctx: &str, flags: &mut Flags) -> Result<ExecArgs, OciError> {
    let mut exec = ExecArgs::default();
    let values = [
        "process",
        "p",
        "pid-file",
        "console-socket",
        "cwd",
        "env",
        "e",
        "user",
        "u",
        "preserve-fds",
        "process-label",
        "apparmor",
        "cap",
        "c",
        "cgroup",
    ];
    let mut id = None;
    while let Some(item) = flags.next(&values)? {
        match item {
            Item::Positional(p) => {
                id = Some(p);
                break;
            }
            Item::Flag(name, value) => match name.as_str() {
                "process" | "p" => exec.process = value.map(PathBuf::from),
                "tty" | "t" => exec.tty = boolean(ctx, &name, value)?,
                "detach" | "d" => exec.detach = boolean(ctx, &name, value)?,
                "pid-file" => exec.pid_file = value.map(PathBuf::from),
                "console-socket" => exec.console_socket = value.map(PathBuf::from),
                "cwd" => exec.cwd = value,
                "env" | "e" => exec.env.extend(value),
                "user" | "u" => exec.user = value.filter(|u| !u.is_empty()),
                "preserve-fds" => check_preserve_fds(ctx, value.as_deref())?,
                // The VM is the boundary: labels, profiles and capabilities of a further
                // process are those of the container's first.
                "process-label" | "apparmor" | "cap" | "c" | "cgroup" | "no-new-privs" => {}
                other => return Err(unknown(ctx, other)),
            },
        }
    }
    exec.id = id.ok_or_else(|| OciError::Usage(format!("{ctx}: a container ID is required")))?;
    exec.command = flags.rest();
    if exec.process.is_none() && exec.command.is_empty() {
        return Err(OciError::Usage(format!(
            "{ctx}: give a command or --process FILE"
        )));
    }
    Ok(exec)
}

/// `--preserve-fds N`: extra descriptors for the process, which cannot cross into a VM.
fn check_preserve_fds(ctx: &str, value: Option<&str>) -> Result<(), OciError> {
    match value.map(str::parse::<u32>) {
        Some(Ok(0)) => Ok(()),
        Some(Ok(n)) => Err(OciError::Usage(format!(
            "{ctx}: --preserve-fds {n}: descriptors cannot be passed into a VM"
        ))),
        _ => Err(OciError::Usage(format!(
            "{ctx}: --preserve-fds: expected a number"
        ))),
    }
}

/// Signal names as `kill` takes them: `9`, `KILL`, `SIGKILL`, `sigkill`.
pub fn parse_signal(text: &str) -> Result<i32, OciError> {
    if let Ok(n) = text.parse::<i32>() {
        if (1..=64).contains(&n) {
            return Ok(n);
        }
        return Err(OciError::Usage(format!("invalid signal {text:?}")));
    }
    let upper = text.to_ascii_uppercase();
    let name = upper.strip_prefix("SIG").unwrap_or(&upper);
    let sig = match name {
        "HUP" => libc::SIGHUP,
        "INT" => libc::SIGINT,
        "QUIT" => libc::SIGQUIT,
        "ILL" => libc::SIGILL,
        "TRAP" => libc::SIGTRAP,
        "ABRT" | "IOT" => libc::SIGABRT,
        "BUS" => libc::SIGBUS,
        "FPE" => libc::SIGFPE,
        "KILL" => libc::SIGKILL,
        "USR1" => libc::SIGUSR1,
        "SEGV" => libc::SIGSEGV,
        "USR2" => libc::SIGUSR2,
        "PIPE" => libc::SIGPIPE,
        "ALRM" => libc::SIGALRM,
        "TERM" => libc::SIGTERM,
        "STKFLT" => libc::SIGSTKFLT,
        "CHLD" | "CLD" => libc::SIGCHLD,
        "CONT" => libc::SIGCONT,
        "STOP" => libc::SIGSTOP,
        "TSTP" => libc::SIGTSTP,
        "TTIN" => libc::SIGTTIN,
        "TTOU" => libc::SIGTTOU,
        "URG" => libc::SIGURG,
        "XCPU" => libc::SIGXCPU,
        "XFSZ" => libc::SIGXFSZ,
        "VTALRM" => libc::SIGVTALRM,
        "PROF" => libc::SIGPROF,
        "WINCH" => libc::SIGWINCH,
        "IO" | "POLL" => libc::SIGIO,
        "PWR" => libc::SIGPWR,
        "SYS" => libc::SIGSYS,
        _ => {
            return parse_realtime(name)
                .ok_or_else(|| OciError::Usage(format!("invalid signal {text:?}")))
        }
    };
    Ok(sig)
}

/// `RTMIN`, `RTMIN+3`, `RTMAX-1`.
fn parse_realtime(name: &str) -> Option<i32> {
    let (min, max) = (libc::SIGRTMIN(), libc::SIGRTMAX());
    let sig = if let Some(rest) = name.strip_prefix("RTMIN") {
        min + if rest.is_empty() {
            0
        } else {
            rest.strip_prefix('+')?.parse::<i32>().ok()?
        }
    } else if let Some(rest) = name.strip_prefix("RTMAX") {
        max - if rest.is_empty() {
            0
        } else {
            rest.strip_prefix('-')?.parse::<i32>().ok()?
        }
    } else {
        return None;
    };
    (min..=max).contains(&sig).then_some(sig)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(line: &str) -> Vec<String> {
        line.split_whitespace().map(String::from).collect()
    }

    fn parsed(line: &str) -> Invocation {
        parse(&words(line)).unwrap()
    }

    fn error(line: &str) -> String {
        parse(&words(line)).unwrap_err().to_string()
    }

    #[test]
    fn globals_come_in_both_spellings() {
        let inv =
            parsed("--root /r --log=/l.json --log-format json --systemd-cgroup --debug state x");
        assert_eq!(inv.globals.root, PathBuf::from("/r"));
        assert_eq!(inv.globals.log, Some(PathBuf::from("/l.json")));
        assert_eq!(inv.globals.log_format, LogFormat::Json);
        assert!(inv.globals.debug);
        assert_eq!(inv.command, Command::State { id: "x".into() });
        let inv = parsed("-root=/r --rootless false --criu /x start c1");
        assert_eq!(inv.globals.root, PathBuf::from("/r"));
        assert_eq!(inv.command, Command::Start { id: "c1".into() });
        assert_eq!(parsed("state y").globals.root, PathBuf::from(DEFAULT_ROOT));
        assert_eq!(parsed("--version").command, Command::Version);
        assert_eq!(parsed("-v").command, Command::Version);
    }

    #[test]
    fn create_takes_runc_options() {
        let inv = parsed(
            "create --bundle /b --pid-file=/p --console-socket /s --no-pivot \
             --no-new-keyring --preserve-fds 0 abc",
        );
        assert_eq!(
            inv.command,
            Command::Create(CreateArgs {
                id: "abc".into(),
                bundle: "/b".into(),
                pid_file: Some("/p".into()),
                console_socket: Some("/s".into()),
            })
        );
        let Command::Create(c) = parsed("create -b /b2 id2").command else {
            panic!("not create");
        };
        assert_eq!(c.bundle, PathBuf::from("/b2"));
        let Command::Run(c) = parsed("run --detach id3").command else {
            panic!("not run");
        };
        assert_eq!(c.bundle, PathBuf::from("."));
    }

    #[test]
    fn kill_and_delete() {
        assert_eq!(
            parsed("kill --all c KILL").command,
            Command::Kill {
                id: "c".into(),
                signal: libc::SIGKILL
            }
        );
        assert_eq!(
            parsed("kill c").command,
            Command::Kill {
                id: "c".into(),
                signal: libc::SIGTERM
            }
        );
        assert_eq!(
            parsed("delete --force c").command,
            Command::Delete {
                id: "c".into(),
                force: true
            }
        );
        assert_eq!(
            parsed("delete c").command,
            Command::Delete {
                id: "c".into(),
                force: false
            }
        );
    }

    #[test]
    fn exec_stops_at_the_id() {
        let Command::Exec(e) =
            parsed("exec -t -d --pid-file /p -e A=1 --env=B=2 -u 1:2 --cwd /w c sh -c -x").command
        else {
            panic!("not exec");
        };
        assert!(e.tty && e.detach);
        assert_eq!(e.env, ["A=1", "B=2"]);
        assert_eq!(e.user.as_deref(), Some("1:2"));
        assert_eq!(e.cwd.as_deref(), Some("/w"));
        assert_eq!(e.id, "c");
        assert_eq!(e.command, ["sh", "-c", "-x"]);
        let Command::Exec(e) = parsed("exec --process /p.json c").command else {
            panic!("not exec");
        };
        assert_eq!(e.process, Some(PathBuf::from("/p.json")));
        assert!(error("exec c").contains("give a command or --process"));
    }

    #[test]
    fn bad_command_lines_are_one_line_errors() {
        assert_eq!(error(""), "hearth oci: no command given");
        assert!(error("frobnicate x").contains("unknown command \"frobnicate\""));
        assert_eq!(
            error("--bogus state x"),
            "hearth oci: unknown option --bogus"
        );
        assert_eq!(
            error("start"),
            "hearth oci start: a container ID is required"
        );
        assert!(error("start a b").contains("expected one container ID"));
        assert!(error("--log-format xml state x").contains("expected text or json"));
        assert!(error("create --bundle").contains("--bundle needs a value"));
        assert!(error("create --preserve-fds 2 x").contains("cannot be passed into a VM"));
        assert!(error("kill c NOPE").contains("invalid signal \"NOPE\""));
        assert!(error("list --format yaml").contains("expected table or json"));
    }

    #[test]
    fn signals_parse_like_runc() {
        assert_eq!(parse_signal("9").unwrap(), 9);
        assert_eq!(parse_signal("KILL").unwrap(), libc::SIGKILL);
        assert_eq!(parse_signal("SIGTERM").unwrap(), libc::SIGTERM);
        assert_eq!(parse_signal("sigusr1").unwrap(), libc::SIGUSR1);
        assert_eq!(parse_signal("RTMIN+2").unwrap(), libc::SIGRTMIN() + 2);
        assert_eq!(parse_signal("SIGRTMAX").unwrap(), libc::SIGRTMAX());
        for bad in ["0", "65", "-1", "FOO", "RTMIN+99", ""] {
            assert!(parse_signal(bad).is_err(), "{bad}");
        }
    }
}
