//! Dockerfiles, parsed into the steps of a template build.
//!
//! Ember runs a Dockerfile's `RUN` steps inside a sandbox, so it supports
//! the instructions that make sense there: `FROM` (one stage), `RUN`,
//! `COPY`/`ADD` from the build context, `ENV`, `ARG`, `WORKDIR`, `USER`,
//! `CMD`/`ENTRYPOINT` (the default start command), and `LABEL`/`EXPOSE`
//! (recorded, no effect). Anything else is refused with its line, before
//! any sandbox starts.

use std::collections::BTreeMap;

/// A command as written: shell form (run by `/bin/sh -c`) or exec form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Shell(String),
    Exec(Vec<String>),
}

impl Command {
    /// The argv to run.
    pub fn argv(&self) -> Vec<String> {
        match self {
            Command::Shell(s) => vec!["/bin/sh".into(), "-c".into(), s.clone()],
            Command::Exec(v) => v.clone(),
        }
    }
}

/// One instruction, with variables not yet expanded (that needs the build's
/// `ARG` and `ENV` state at that point).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    From(String),
    Run(Command),
    Copy {
        sources: Vec<String>,
        dest: String,
    },
    Env(Vec<(String, String)>),
    Arg {
        name: String,
        default: Option<String>,
    },
    Workdir(String),
    User(String),
    Cmd(Command),
    Entrypoint(Command),
    /// `LABEL`, `EXPOSE`: accepted, no effect on the template.
    Noted(&'static str),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instruction {
    /// 1-based line where the instruction starts.
    pub line: usize,
    pub kind: Kind,
    /// The instruction as written (continuations joined), for logs and the
    /// step cache.
    pub text: String,
}

/// A parsed Dockerfile: `ARG`s before `FROM`, then the one stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dockerfile {
    pub instructions: Vec<Instruction>,
}

/// Why a Dockerfile was refused: the line and what to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Dockerfile line {line}: {reason}")]
pub struct ParseError {
    pub line: usize,
    pub reason: String,
}

fn err(line: usize, reason: impl Into<String>) -> ParseError {
    ParseError {
        line,
        reason: reason.into(),
    }
}

impl Dockerfile {
    pub fn parse(text: &str) -> Result<Dockerfile, ParseError> {
        let mut instructions = Vec::new();
        let mut seen_from = false;
        for (line, joined) in logical_lines(text) {
            let (word, rest) = match joined.split_once(char::is_whitespace) {
                Some((w, r)) => (w, r.trim()),
                None => (joined.as_str(), ""),
            };
            let keyword = word.to_ascii_uppercase();
            let heredoc = rest.find("<<").is_some_and(|pos| {
                rest[pos + 2..]
                    .trim_start_matches(['-', '"', '\''])
                    .starts_with(|c: char| c.is_ascii_uppercase())
            });
            if heredoc && matches!(keyword.as_str(), "RUN" | "COPY" | "ADD") {
                return Err(err(
                    line,
                    format!(
                        "{keyword} with a heredoc is not supported: put the script in the build context and COPY it"
                    ),
                ));
            }
            let kind = match keyword.as_str() {
                "FROM" => {
                    if seen_from {
                        return Err(err(
                            line,
                            "a second FROM: multi-stage builds are not supported; build one stage",
                        ));
                    }
                    seen_from = true;
                    let mut words = rest.split_whitespace();
                    let image = words.next().filter(|w| !w.starts_with("--")).ok_or_else(|| {
                        err(line, "FROM needs an image reference or a template name (flags such as --platform are not supported)")
                    })?;
                    if let Some(extra) = words.next() {
                        return Err(err(
                            line,
                            format!(
                                "FROM {image} {extra}…: stage names (AS) are not supported; drop them"
                            ),
                        ));
                    }
                    Kind::From(image.to_owned())
                }
                "RUN" => {
                    if rest.starts_with("--") {
                        return Err(err(
                            line,
                            "RUN flags (--mount, --network, …) are not supported",
                        ));
                    }
                    Kind::Run(command(line, "RUN", rest)?)
                }
                "COPY" | "ADD" => copy(line, &keyword, rest)?,
                "ENV" => Kind::Env(env_pairs(line, rest)?),
                "ARG" => {
                    let mut words = rest.split_whitespace();
                    let (Some(def), None) = (words.next(), words.next()) else {
                        return Err(err(line, "ARG takes one NAME or NAME=default"));
                    };
                    match def.split_once('=') {
                        Some((name, default)) => Kind::Arg {
                            name: checked_name(line, name)?,
                            default: Some(unquote(default)),
                        },
                        None => Kind::Arg {
                            name: checked_name(line, def)?,
                            default: None,
                        },
                    }
                }
                "WORKDIR" => {
                    if rest.is_empty() {
                        return Err(err(line, "WORKDIR needs a path"));
                    }
                    Kind::Workdir(unquote(rest))
                }
                "USER" => {
                    if rest.is_empty() || rest.contains(char::is_whitespace) {
                        return Err(err(line, "USER takes one user name or uid"));
                    }
                    Kind::User(rest.to_owned())
                }
                "CMD" => Kind::Cmd(command(line, "CMD", rest)?),
                "ENTRYPOINT" => Kind::Entrypoint(command(line, "ENTRYPOINT", rest)?),
                "LABEL" => Kind::Noted("LABEL"),
                "EXPOSE" => Kind::Noted("EXPOSE"),
                "HEALTHCHECK" => {
                    return Err(err(
                        line,
                        "HEALTHCHECK is not supported: give the build a ready check (a command or a port) instead",
                    ));
                }
                "ONBUILD" | "SHELL" | "STOPSIGNAL" | "VOLUME" | "MAINTAINER" => {
                    return Err(err(
                        line,
                        format!("{keyword} is not supported by Ember template builds; remove it"),
                    ));
                }
                _ => {
                    return Err(err(line, format!("unknown instruction {word:?}")));
                }
            };
            if !seen_from && !matches!(kind, Kind::Arg { .. }) {
                return Err(err(
                    line,
                    format!(
                        "{keyword} before FROM: a Dockerfile starts with FROM (only ARG may precede it)"
                    ),
                ));
            }
            instructions.push(Instruction {
                line,
                kind,
                text: joined,
            });
        }
        if !seen_from {
            return Err(err(1, "no FROM: a Dockerfile starts with FROM IMAGE"));
        }
        Ok(Dockerfile { instructions })
    }
}

/// Lines with comments dropped and `\` continuations joined, each with the
/// number of the line it starts on.
fn logical_lines(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (i, raw) in text.lines().enumerate() {
        let trimmed = raw.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_none()) {
            continue;
        }
        let (body, continues) = match trimmed.strip_suffix('\\') {
            Some(b) => (b.trim_end(), true),
            None => (trimmed, false),
        };
        let entry = current.get_or_insert_with(|| (i + 1, String::new()));
        if !entry.1.is_empty() && !body.is_empty() {
            entry.1.push(' ');
        }
        entry.1.push_str(body);
        if !continues {
            out.extend(current.take().filter(|(_, s)| !s.is_empty()));
        }
    }
    out.extend(current.filter(|(_, s)| !s.is_empty()));
    out
}

fn command(line: usize, keyword: &str, rest: &str) -> Result<Command, ParseError> {
    if rest.is_empty() {
        return Err(err(line, format!("{keyword} needs a command")));
    }
    if rest.starts_with('[') {
        return match serde_json::from_str::<Vec<String>>(rest) {
            Ok(v) if !v.is_empty() => Ok(Command::Exec(v)),
            _ => Err(err(
                line,
                format!(
                    "{keyword}'s exec form must be a JSON array of strings, e.g. [\"python3\", \"-m\", \"http.server\"]"
                ),
            )),
        };
    }
    Ok(Command::Shell(rest.to_owned()))
}

fn copy(line: usize, keyword: &str, rest: &str) -> Result<Kind, ParseError> {
    let words: Vec<String> = if rest.starts_with('[') {
        serde_json::from_str(rest).map_err(|_| {
            err(
                line,
                format!("{keyword}'s JSON form must be an array of strings"),
            )
        })?
    } else {
        rest.split_whitespace().map(str::to_owned).collect()
    };
    if let Some(flag) = words.iter().find(|w| w.starts_with("--")) {
        let hint = if flag.starts_with("--chown") || flag.starts_with("--chmod") {
            format!("; {keyword} as is and RUN chown/chmod after it")
        } else if flag.starts_with("--from") {
            "; multi-stage builds are not supported".to_owned()
        } else {
            String::new()
        };
        return Err(err(
            line,
            format!("{keyword} {flag} is not supported{hint}"),
        ));
    }
    if words.len() < 2 {
        return Err(err(
            line,
            format!("{keyword} needs a source in the build context and a destination"),
        ));
    }
    let (dest, sources) = words.split_last().expect("two or more");
    for s in sources {
        if keyword == "ADD" && (s.contains("://") || s.starts_with("git@")) {
            return Err(err(
                line,
                format!(
                    "ADD {s}: remote sources are not supported; RUN a download in the build instead"
                ),
            ));
        }
        if keyword == "ADD"
            && [".tar", ".tar.gz", ".tgz", ".tar.xz", ".tar.bz2"]
                .iter()
                .any(|ext| s.ends_with(ext))
        {
            return Err(err(
                line,
                format!("ADD {s}: archives are not unpacked by Ember builds; COPY it and RUN tar"),
            ));
        }
    }
    Ok(Kind::Copy {
        sources: sources.to_vec(),
        dest: dest.clone(),
    })
}

fn checked_name(line: usize, name: &str) -> Result<String, ParseError> {
    let ok = !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(name.to_owned())
    } else {
        Err(err(
            line,
            format!("{name:?} is not a variable name (letters, digits, _)"),
        ))
    }
}

/// `ENV A=1 B="two words"` or the legacy `ENV A one value`.
fn env_pairs(line: usize, rest: &str) -> Result<Vec<(String, String)>, ParseError> {
    let first = rest.split_whitespace().next().unwrap_or_default();
    if !first.contains('=') {
        let (name, value) = rest
            .split_once(char::is_whitespace)
            .ok_or_else(|| err(line, "ENV needs NAME=value"))?;
        return Ok(vec![(checked_name(line, name)?, value.trim().to_owned())]);
    }
    let mut pairs = Vec::new();
    for word in words(rest) {
        let (name, value) = word
            .split_once('=')
            .ok_or_else(|| err(line, format!("ENV {word:?}: expected NAME=value")))?;
        pairs.push((checked_name(line, name)?, value.to_owned()));
    }
    Ok(pairs)
}

/// Split on whitespace outside quotes; quotes removed, `\` escapes kept literal.
fn words(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    let mut any = false;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (None, c) if c.is_whitespace() => {
                if any {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            (None, '"' | '\'') => {
                quote = Some(c);
                any = true;
            }
            (Some(q), c) if c == q => quote = None,
            (_, '\\') => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
                any = true;
            }
            (_, c) => {
                cur.push(c);
                any = true;
            }
        }
    }
    if any {
        out.push(cur);
    }
    out
}

fn unquote(s: &str) -> String {
    words(s).join(" ")
}

/// Expand `$NAME`, `${NAME}` and `${NAME:-default}` from `vars`; unknown
/// names expand to nothing, as in Docker.
pub fn expand(s: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(body) = after.strip_prefix('{')
            && let Some(end) = body.find('}')
        {
            let inner = &body[..end];
            let (name, default) = match inner.split_once(":-") {
                Some((n, d)) => (n, Some(d)),
                None => (inner, None),
            };
            match (vars.get(name), default) {
                (Some(v), _) if !v.is_empty() || default.is_none() => out.push_str(v),
                (_, Some(d)) => out.push_str(d),
                _ => {}
            }
            rest = &body[end + 1..];
            continue;
        }
        let len = after
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(after.len());
        if len == 0 {
            out.push('$');
        } else if let Some(v) = vars.get(&after[..len]) {
            out.push_str(v);
        }
        rest = &after[len..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_supported_instructions_with_continuations_and_comments() {
        let df = Dockerfile::parse(
            "# syntax=docker/dockerfile:1\nARG BASE=docker://reg/app:1\nFROM $BASE\n\
             ENV A=1 B=\"two words\"\nENV LEGACY some value\n\
             RUN echo a && \\\n    # a comment inside\n    echo b\n\
             COPY app.py lib/ /app/\nWORKDIR /app\nUSER nobody\n\
             CMD [\"python3\", \"-m\", \"http.server\"]\nEXPOSE 8000\n",
        )
        .unwrap();
        let kinds: Vec<&Kind> = df.instructions.iter().map(|i| &i.kind).collect();
        assert_eq!(
            kinds[0],
            &Kind::Arg {
                name: "BASE".into(),
                default: Some("docker://reg/app:1".into())
            }
        );
        assert_eq!(kinds[1], &Kind::From("$BASE".into()));
        assert_eq!(
            kinds[2],
            &Kind::Env(vec![
                ("A".into(), "1".into()),
                ("B".into(), "two words".into())
            ])
        );
        assert_eq!(
            kinds[3],
            &Kind::Env(vec![("LEGACY".into(), "some value".into())])
        );
        assert_eq!(
            kinds[4],
            &Kind::Run(Command::Shell("echo a && echo b".into()))
        );
        assert_eq!(df.instructions[4].line, 6);
        assert_eq!(
            kinds[5],
            &Kind::Copy {
                sources: vec!["app.py".into(), "lib/".into()],
                dest: "/app/".into()
            }
        );
        assert_eq!(kinds[6], &Kind::Workdir("/app".into()));
        assert_eq!(kinds[7], &Kind::User("nobody".into()));
        assert_eq!(
            kinds[8],
            &Kind::Cmd(Command::Exec(vec![
                "python3".into(),
                "-m".into(),
                "http.server".into()
            ]))
        );
        assert_eq!(kinds[9], &Kind::Noted("EXPOSE"));
    }

    #[test]
    fn refuses_what_it_does_not_support_naming_the_line() {
        let cases = [
            ("FROM a\nHEALTHCHECK CMD true\n", 2, "HEALTHCHECK"),
            ("FROM a\nVOLUME /data\n", 2, "VOLUME"),
            ("FROM a\nFROM b\n", 2, "multi-stage"),
            ("FROM a AS build\n", 1, "AS"),
            ("FROM a\nCOPY --from=x /a /b\n", 2, "--from"),
            ("FROM a\nCOPY --chown=1:1 a /b\n", 2, "RUN chown"),
            ("FROM a\nADD https://x/y.tgz /y\n", 2, "remote"),
            ("FROM a\nADD a.tar.gz /y\n", 2, "RUN tar"),
            ("FROM a\nRUN <<EOF\necho\nEOF\n", 2, "heredoc"),
            (
                "FROM a\nRUN --mount=type=cache,target=/x true\n",
                2,
                "flags",
            ),
            (
                "FROM a\nFROBNICATE x\n",
                2,
                "unknown instruction \"FROBNICATE\"",
            ),
            ("RUN true\n", 1, "before FROM"),
            ("# nothing\n", 1, "no FROM"),
            ("FROM a\nCOPY onlyone\n", 2, "destination"),
            ("FROM a\nCMD [\"a\", 1]\n", 2, "JSON array"),
            ("FROM a\nENV 1X=2\n", 2, "variable name"),
        ];
        for (text, line, needle) in cases {
            let e = Dockerfile::parse(text).unwrap_err();
            assert_eq!(e.line, line, "{text:?}: {e}");
            assert!(e.to_string().contains(needle), "{text:?}: {e}");
        }
    }

    #[test]
    fn expands_variables_like_docker() {
        let vars: BTreeMap<String, String> = [("A".into(), "x".into()), ("E".into(), "".into())]
            .into_iter()
            .collect();
        assert_eq!(expand("$A/${A}/${B:-d}/${E:-e}/$B/$", &vars), "x/x/d/e//$");
        assert_eq!(expand("pre${A}post", &vars), "prexpost");
    }
}
