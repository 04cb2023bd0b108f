//! A kernel command line read the way Linux reads it (`next_arg` in kernel/params.c), so
//! that hearth knows which parameters the user set and where init's arguments begin: a
//! parameter is `name` or `name=value`, whitespace separates parameters except inside
//! double quotes, and a bare `--` (quoted or not) ends the kernel's part of the line.

/// One parameter of a command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Param<'a> {
    /// Where the parameter's text starts and ends in the line (quotes included).
    pub start: usize,
    pub end: usize,
    /// The text before the first `=`, without the quote that may open the parameter.
    pub name: &'a str,
    /// The text after the first `=`, without the quotes around it; `None` for a bare flag.
    pub value: Option<&'a str>,
}

impl Param<'_> {
    /// Whether this parameter is the `--` that hands the rest of the line to init.
    pub fn is_separator(&self) -> bool {
        self.value.is_none() && self.name == "--"
    }
}

/// The kernel's `isspace`; hearth's command lines hold printable ASCII only, but a config
/// file may still carry a tab, and the kernel would split there too.
fn is_space(byte: u8) -> bool {
    matches!(byte, b' ' | b'\t' | b'\n' | b'\x0b' | b'\x0c' | b'\r')
}

/// The parameters of `line`, in order, including a `--` and whatever follows it.
pub fn params(line: &str) -> Vec<Param<'_>> {
    let bytes = line.as_bytes();
    let mut params = Vec::new();
    let mut at = 0;
    loop {
        while at < bytes.len() && is_space(bytes[at]) {
            at += 1;
        }
        if at == bytes.len() {
            return params;
        }
        let start = at;
        let quoted = bytes[at] == b'"';
        let body = if quoted { at + 1 } else { at };
        let mut in_quote = quoted;
        let mut equals = None;
        let mut end = body;
        while end < bytes.len() && (in_quote || !is_space(bytes[end])) {
            match bytes[end] {
                b'=' if equals.is_none() => equals = Some(end),
                b'"' => in_quote = !in_quote,
                _ => {}
            }
            end += 1;
        }
        // Quotes are ASCII, so every index used here is a char boundary.
        let closing_quote = end > body && bytes[end - 1] == b'"';
        let (name, value) = match equals {
            None => {
                let name_end = if quoted && closing_quote {
                    end - 1
                } else {
                    end
                };
                (&line[body..name_end], None)
            }
            Some(eq) => {
                let mut value = &line[eq + 1..end];
                if let Some(unquoted) = value.strip_prefix('"') {
                    value = unquoted.strip_suffix('"').unwrap_or(unquoted);
                } else if quoted && closing_quote {
                    value = &value[..value.len() - 1];
                }
                (&line[body..eq], Some(value))
            }
        };
        params.push(Param {
            start,
            end,
            name,
            value,
        });
        at = end;
    }
}

/// A parameter name as the kernel compares it: `-` and `_` are the same (`parameq`).
pub fn normalized_name(name: &str) -> String {
    name.replace('-', "_")
}

/// The kernel's parameters in `line`: those before a `--`.
pub fn kernel_params(line: &str) -> impl Iterator<Item = Param<'_>> {
    params(line).into_iter().take_while(|p| !p.is_separator())
}

/// The names of the kernel's parameters in `line` (those before a `--`), normalized.
pub fn kernel_param_names(line: &str) -> Vec<String> {
    kernel_params(line)
        .map(|p| normalized_name(p.name))
        .collect()
}

/// Splits `line` at its first `--` into the kernel's part and init's part, both trimmed;
/// init's part is `None` when there is no `--` or nothing after it.
pub fn split_at_separator(line: &str) -> (&str, Option<&str>) {
    match params(line).into_iter().find(Param::is_separator) {
        Some(separator) => {
            let init = line[separator.end..].trim();
            (
                line[..separator.start].trim(),
                (!init.is_empty()).then_some(init),
            )
        }
        None => (line.trim(), None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names_and_values(line: &str) -> Vec<(&str, Option<&str>)> {
        params(line).iter().map(|p| (p.name, p.value)).collect()
    }

    #[test]
    fn flags_and_values() {
        assert_eq!(
            names_and_values("  console=ttyS0  quiet panic=1 "),
            [
                ("console", Some("ttyS0")),
                ("quiet", None),
                ("panic", Some("1"))
            ]
        );
        assert_eq!(names_and_values(""), []);
        assert_eq!(names_and_values("a=b=c"), [("a", Some("b=c"))]);
        assert_eq!(names_and_values("empty="), [("empty", Some(""))]);
    }

    #[test]
    fn quotes_keep_spaces_inside_one_parameter() {
        assert_eq!(
            names_and_values(r#"dyndbg="file x.c +p" "quoted flag" "k=v w" z"#),
            [
                ("dyndbg", Some("file x.c +p")),
                ("quoted flag", None),
                ("k", Some("v w")),
                ("z", None)
            ]
        );
        // An unterminated quote runs to the end of the line, as in the kernel.
        assert_eq!(names_and_values(r#"a="b c"#), [("a", Some("b c"))]);
    }

    #[test]
    fn positions_cover_the_parameter_text() {
        let line = r#"a "b c" d=e"#;
        let spans: Vec<&str> = params(line).iter().map(|p| &line[p.start..p.end]).collect();
        assert_eq!(spans, ["a", r#""b c""#, "d=e"]);
    }

    #[test]
    fn names_compare_with_dashes_as_underscores() {
        assert_eq!(
            kernel_param_names("no-timer-check tsc=reliable -- init-arg"),
            ["no_timer_check", "tsc"]
        );
    }

    #[test]
    fn the_separator_is_a_bare_double_dash_outside_quotes() {
        assert_eq!(
            split_at_separator("console=ttyS0 -- /bin/sh -c 'a -- b'"),
            ("console=ttyS0", Some("/bin/sh -c 'a -- b'"))
        );
        assert_eq!(
            split_at_separator(r#"x="a -- b" y"#),
            (r#"x="a -- b" y"#, None)
        );
        assert_eq!(split_at_separator("a --x --=1"), ("a --x --=1", None));
        // The kernel strips the quotes of `"--"` and then stops there too.
        assert_eq!(split_at_separator(r#"a "--" b"#), ("a", Some("b")));
        assert_eq!(split_at_separator("a --   "), ("a", None));
        assert_eq!(split_at_separator("-- init"), ("", Some("init")));
    }
}
