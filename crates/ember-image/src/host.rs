//! What the image build needs from the host: its tools (found, run, and
//! named with the package that provides them when absent) and its apt
//! configuration (which Debian mirror to use).

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::{Error, Result};

/// A host program and the Debian package that provides it.
#[derive(Debug, Clone, Copy)]
pub struct Tool {
    pub name: &'static str,
    pub package: &'static str,
}

pub(crate) const APT_GET: Tool = Tool {
    name: "apt-get",
    package: "apt",
};
pub(crate) const APT_CACHE: Tool = Tool {
    name: "apt-cache",
    package: "apt",
};
pub(crate) const DPKG_DEB: Tool = Tool {
    name: "dpkg-deb",
    package: "dpkg",
};
pub(crate) const DEPMOD: Tool = Tool {
    name: "depmod",
    package: "kmod",
};
pub(crate) const DEBOOTSTRAP: Tool = Tool {
    name: "debootstrap",
    package: "debootstrap",
};
pub(crate) const MKFS_EXT4: Tool = Tool {
    name: "mkfs.ext4",
    package: "e2fsprogs",
};
pub const QEMU_IMG: Tool = Tool {
    name: "qemu-img",
    package: "qemu-utils",
};
pub(crate) const CHROOT: Tool = Tool {
    name: "chroot",
    package: "coreutils",
};
pub(crate) const CP: Tool = Tool {
    name: "cp",
    package: "coreutils",
};

/// An executable program: `program` itself when it is a path, else the
/// first match in `PATH` and then root's usual directories.
pub fn find_program(program: &Path) -> Option<PathBuf> {
    if program.components().count() > 1 {
        return is_executable(program).then(|| program.to_path_buf());
    }
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path_var)
        .chain(EXTRA_DIRS.iter().map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|candidate| is_executable(candidate))
}

/// How many lines of a failed tool's output an error quotes.
const TAIL_LINES: usize = 12;

/// Root's tools live in sbin, which a non-login PATH may lack.
const EXTRA_DIRS: &[&str] = &[
    "/usr/local/sbin",
    "/usr/local/bin",
    "/usr/sbin",
    "/usr/bin",
    "/sbin",
    "/bin",
];

impl Tool {
    /// Where the tool is: `PATH`, then root's usual directories.
    pub fn path(&self) -> Result<PathBuf> {
        find_program(Path::new(self.name)).ok_or(Error::ToolMissing {
            tool: self.name,
            package: self.package,
        })
    }

    /// A command for this tool with a predictable locale (its messages are
    /// matched on) and no interactive prompts. If this process dies, the
    /// tool is killed rather than left writing into a directory the next
    /// builder will clean up.
    pub(crate) fn command(&self) -> Result<Command> {
        Ok(Self::command_of(&self.path()?))
    }

    /// [`Tool::command`] for the tool at `program`: its path inside a jail.
    pub(crate) fn command_of(program: &Path) -> Command {
        let mut cmd = Command::new(program);
        cmd.env("LC_ALL", "C")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null());
        // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no
        // memory of the parent; it is all the child runs before exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd
    }

    /// Run to completion and return stdout; stderr goes into the error.
    pub(crate) fn output(&self, cmd: &mut Command) -> Result<String> {
        tracing::debug!(tool = self.name, ?cmd, "running");
        let out = cmd.output().map_err(|source| Error::Spawn {
            tool: self.name.into(),
            source,
        })?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            return Err(self.failed(out.status, &tail(stderr.lines())));
        }
        String::from_utf8(out.stdout).map_err(|_| Error::ToolOutput {
            tool: self.name.into(),
            reason: "output is not UTF-8".into(),
        })
    }

    /// Run to completion, handing each line of stdout and stderr (merged)
    /// to `on_line` as it arrives.
    pub(crate) fn stream(&self, mut cmd: Command, mut on_line: impl FnMut(&str)) -> Result<()> {
        tracing::debug!(tool = self.name, ?cmd, "running");
        let spawn_err = |source| Error::Spawn {
            tool: self.name.into(),
            source,
        };
        let (reader, writer) = std::io::pipe().map_err(spawn_err)?;
        cmd.stdout(writer.try_clone().map_err(spawn_err)?)
            .stderr(writer);
        let mut child = cmd.spawn().map_err(spawn_err)?;
        // The Command holds the pipe's write ends; drop them so the read
        // side sees end-of-file when the child exits.
        drop(cmd);
        let mut last = VecDeque::with_capacity(TAIL_LINES);
        for line in BufReader::new(reader).split(b'\n') {
            let Ok(line) = line else { break };
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end();
            if line.is_empty() {
                continue;
            }
            on_line(line);
            if last.len() == TAIL_LINES {
                last.pop_front();
            }
            last.push_back(line.to_owned());
        }
        let status = child.wait().map_err(spawn_err)?;
        if !status.success() {
            return Err(self.failed(status, &last.into_iter().collect::<Vec<_>>().join("\n")));
        }
        Ok(())
    }

    fn failed(&self, status: std::process::ExitStatus, output: &str) -> Error {
        Error::CommandFailed {
            tool: self.name.into(),
            status: status.to_string(),
            output: output.to_owned(),
        }
    }
}

fn tail<'a>(lines: impl Iterator<Item = &'a str>) -> String {
    let lines: Vec<_> = lines.filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n")
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Turn a tool failure that was a failure to reach the mirror into an error
/// that says so.
pub(crate) fn mirror_hint(err: Error, mirror: &str) -> Error {
    const SIGNS: &[&str] = &[
        "Temporary failure resolving",
        "Could not resolve",
        "Could not connect",
        "Connection timed out",
        "Network is unreachable",
        "No route to host",
        "Failed to fetch",
        "Couldn't download",
        "Couldn't retrieve",
    ];
    match err {
        Error::CommandFailed { tool, output, .. } if SIGNS.iter().any(|s| output.contains(s)) => {
            Error::MirrorUnreachable {
                tool,
                mirror: mirror.to_owned(),
                output,
            }
        }
        other => other,
    }
}

pub(crate) const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";

/// The Debian mirror the host's apt uses for `suite`, or Debian's default.
pub(crate) fn host_mirror(suite: &str) -> String {
    let mut files = Vec::new();
    if let Ok(text) = std::fs::read_to_string("/etc/apt/sources.list") {
        files.push(("sources.list".to_owned(), text));
    }
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut names: Vec<_> = dir.flatten().map(|e| e.path()).collect();
        names.sort();
        for path in names {
            if let Ok(text) = std::fs::read_to_string(&path) {
                files.push((
                    path.file_name()
                        .unwrap_or_default()
                        .to_string_lossy()
                        .into_owned(),
                    text,
                ));
            }
        }
    }
    mirror_from_sources(&files, suite).unwrap_or_else(|| DEFAULT_MIRROR.to_owned())
}

/// The first `deb` source for exactly `suite` in apt source files given as
/// (file name, contents): one-line `.list` files or deb822 `.sources`.
pub(crate) fn mirror_from_sources(files: &[(String, String)], suite: &str) -> Option<String> {
    files.iter().find_map(|(name, text)| {
        if name.ends_with(".sources") {
            deb822_mirror(text, suite)
        } else if name.ends_with(".list") {
            one_line_mirror(text, suite)
        } else {
            None
        }
    })
}

fn usable(uri: &str) -> bool {
    ["http://", "https://", "file:/"]
        .iter()
        .any(|p| uri.starts_with(p))
}

fn one_line_mirror(text: &str, suite: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let mut words = line.split('#').next()?.split_whitespace();
        if words.next()? != "deb" {
            return None;
        }
        let mut uri = words.next()?;
        if uri.starts_with('[') {
            // Options: `[arch=amd64 signed-by=…]`, possibly spanning words.
            while !uri.ends_with(']') {
                uri = words.next()?;
            }
            uri = words.next()?;
        }
        (words.next()? == suite && usable(uri)).then(|| uri.trim_end_matches('/').to_owned())
    })
}

fn deb822_mirror(text: &str, suite: &str) -> Option<String> {
    text.split("\n\n").find_map(|paragraph| {
        let field = |name: &str| {
            paragraph.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case(name)
                    .then(|| v.trim().to_owned())
            })
        };
        let enabled = field("Enabled").is_none_or(|v| !v.eq_ignore_ascii_case("no"));
        let is_deb = field("Types")?.split_whitespace().any(|t| t == "deb");
        let has_suite = field("Suites")?.split_whitespace().any(|s| s == suite);
        let uri = field("URIs")?
            .split_whitespace()
            .find(|u| usable(u))?
            .trim_end_matches('/')
            .to_owned();
        (enabled && is_deb && has_suite).then_some(uri)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(n, t)| (n.to_string(), t.to_string()))
            .collect()
    }

    #[test]
    fn mirror_from_deb822_skips_other_suites_and_disabled_entries() {
        let debian = "Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n\n\
                      Types: deb\nURIs: http://off.example/debian\nSuites: bookworm\nEnabled: no\n\n\
                      Types: deb deb-src\n# comment\nURIs: http://mirror.example/debian/\nSuites: bookworm bookworm-updates\nComponents: main\n";
        let f = files(&[
            ("debian.sources", debian),
            (
                "nodesource.sources",
                "Types: deb\nURIs: https://n.example\nSuites: nodistro\n",
            ),
        ]);
        assert_eq!(
            mirror_from_sources(&f, "bookworm").as_deref(),
            Some("http://mirror.example/debian")
        );
        assert_eq!(mirror_from_sources(&f, "trixie"), None);
    }

    #[test]
    fn mirror_from_one_line_format_with_options() {
        let list = "# deb http://commented.example/debian bookworm main\n\
                    deb-src http://src.example/debian bookworm main\n\
                    deb [arch=amd64 signed-by=/k.gpg] http://m.example/debian bookworm main contrib\n";
        let f = files(&[
            ("sources.list", list),
            (
                "other.sources",
                "Types: deb\nURIs: http://later.example\nSuites: bookworm\n",
            ),
        ]);
        assert_eq!(
            mirror_from_sources(&f, "bookworm").as_deref(),
            Some("http://m.example/debian")
        );
        let cdrom = files(&[("sources.list", "deb cdrom:[Debian]/ bookworm main\n")]);
        assert_eq!(mirror_from_sources(&cdrom, "bookworm"), None);
    }

    #[test]
    fn missing_tool_names_its_package() {
        let tool = Tool {
            name: "ember-no-such-tool",
            package: "ember-pkg",
        };
        let err = tool.path().unwrap_err();
        assert_eq!(
            err.to_string(),
            "ember-no-such-tool not found: apt-get install ember-pkg"
        );
    }

    #[test]
    fn stream_merges_output_and_failure_quotes_the_tail() {
        let sh = Tool {
            name: "sh",
            package: "dash",
        };
        let mut cmd = sh.command().unwrap();
        cmd.args(["-c", "echo one; echo two >&2; echo three; exit 3"]);
        let mut lines = Vec::new();
        let err = sh.stream(cmd, |l| lines.push(l.to_owned())).unwrap_err();
        assert_eq!(lines.len(), 3);
        assert!(lines.contains(&"two".to_owned()));
        let Error::CommandFailed { status, output, .. } = err else {
            panic!("{err}")
        };
        assert!(status.contains('3'), "{status}");
        assert!(output.contains("three"));
    }

    #[test]
    fn network_failures_name_the_mirror() {
        let err = Error::CommandFailed {
            tool: "apt-get".into(),
            status: "exit status: 100".into(),
            output: "E: Failed to fetch http://x/pool/a.deb  Temporary failure resolving 'x'"
                .into(),
        };
        let err = mirror_hint(err, "http://x");
        assert!(matches!(err, Error::MirrorUnreachable { .. }), "{err}");
        assert!(err.to_string().contains("http://x"));
    }
}
