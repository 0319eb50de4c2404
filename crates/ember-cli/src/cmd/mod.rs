//! One module per subcommand.

pub mod agent;
pub mod client;
pub mod image;
pub mod run;
pub mod server;
pub mod uffd;

/// A secret given as a value (`--flag`, or its environment variable) or as a
/// file (`--flag-file`, first line, trimmed). A value typed on the command
/// line would be visible to every local user in `/proc/*/cmdline`: it is
/// refused, with a message saying to use the file or the environment.
pub fn secret(
    value: Option<String>,
    file: Option<&std::path::Path>,
    flag: &str,
) -> anyhow::Result<Option<String>> {
    use anyhow::Context;
    if value.is_some() && file.is_some() {
        anyhow::bail!("give --{flag} or --{flag}-file, not both");
    }
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading --{flag}-file {}", path.display()))?;
        let token = text.lines().next().unwrap_or("").trim().to_owned();
        if token.is_empty() {
            anyhow::bail!("--{flag}-file {} is empty", path.display());
        }
        return Ok(Some(token));
    }
    let on_argv =
        std::env::args().any(|a| a == format!("--{flag}") || a.starts_with(&format!("--{flag}=")));
    if value.is_some() && on_argv {
        anyhow::bail!(
            "--{flag} on the command line is visible to every local user (/proc/*/cmdline): \
             put the secret in a file only you can read and pass --{flag}-file FILE, or set \
             EMBER_JOIN_TOKEN in the environment"
        );
    }
    Ok(value)
}
