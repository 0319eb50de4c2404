//! Where the server is and which API key to send: flags, then the
//! environment (`EMBER_API_URL`, `EMBER_API_KEY`), then the config file
//! (`$XDG_CONFIG_HOME/ember/config.toml`, else `~/.config/ember/config.toml`,
//! keys `api_url` and `api_key`), then the default URL. Resolution is a pure
//! function of those inputs so it is tested without a server.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::ClientError;

/// The default server: `ember server`'s default listen address.
pub const DEFAULT_API_URL: &str = "http://127.0.0.1:3000";

/// Flags every client command takes (after the subcommand too).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ClientArgs {
    /// URL of the Ember server [env: EMBER_API_URL; default: http://127.0.0.1:3000].
    #[arg(long, global = true, env = "EMBER_API_URL", hide_env = true)]
    pub api_url: Option<String>,
    /// API key [env: EMBER_API_KEY].
    #[arg(
        long,
        global = true,
        env = "EMBER_API_KEY",
        hide_env = true,
        hide_env_values = true
    )]
    pub api_key: Option<String>,
    /// A PEM file of the CA that signed an https:// server's certificate,
    /// when the system does not trust it [env: EMBER_CA].
    #[arg(long, global = true, env = "EMBER_CA", hide_env = true)]
    pub ca: Option<PathBuf>,
}

/// The config file's contents.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub api_url: Option<String>,
    pub api_key: Option<String>,
    pub ca: Option<PathBuf>,
}

/// Where to send requests, and with which key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Base URL without a trailing slash.
    pub url: String,
    pub key: Option<String>,
    /// Extra trusted CA certificates (PEM) for an https:// server.
    pub ca: Option<PathBuf>,
    /// Where the settings were looked for, for error messages.
    pub config_path: Option<PathBuf>,
}

impl Endpoint {
    /// The API key, or an error saying how to provide one.
    pub fn key(&self) -> Result<&str, ClientError> {
        self.key.as_deref().ok_or_else(|| ClientError::MissingKey {
            config: self.config_path.clone(),
        })
    }
}

/// The config file's path: `$XDG_CONFIG_HOME/ember/config.toml`, else
/// `$HOME/.config/ember/config.toml`.
pub fn config_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| PathBuf::from(h).join(".config"))
        })?;
    Some(base.join("ember").join("config.toml"))
}

/// Read the config file; a missing file is an empty config.
pub fn read_config(path: &Path) -> Result<ConfigFile, ClientError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(ConfigFile::default()),
        Err(e) => {
            return Err(ClientError::Config {
                path: path.to_path_buf(),
                detail: e.to_string(),
            });
        }
    };
    toml::from_str(&text).map_err(|e| ClientError::Config {
        path: path.to_path_buf(),
        detail: format!("{} (expected only api_url, api_key and ca)", e.message()),
    })
}

/// Combine flags-or-environment (clap already merged those) with the file.
pub fn resolve(args: &ClientArgs, file: &ConfigFile, config_path: Option<PathBuf>) -> Endpoint {
    let nonempty = |s: &Option<String>| s.as_ref().filter(|v| !v.trim().is_empty()).cloned();
    let url = nonempty(&args.api_url)
        .or_else(|| nonempty(&file.api_url))
        .unwrap_or_else(|| DEFAULT_API_URL.to_owned());
    Endpoint {
        url: url.trim().trim_end_matches('/').to_owned(),
        key: nonempty(&args.api_key)
            .or_else(|| nonempty(&file.api_key))
            .map(|k| k.trim().to_owned()),
        ca: args.ca.clone().or_else(|| file.ca.clone()),
        config_path,
    }
}

/// The endpoint for this invocation: flags and environment, then the file.
pub fn endpoint(args: &ClientArgs) -> Result<Endpoint, ClientError> {
    let path = config_path();
    let file = match &path {
        Some(p) => read_config(p)?,
        None => ConfigFile::default(),
    };
    Ok(resolve(args, &file, path))
}

/// Is a server configured at all (a URL in the flags, environment or file)?
/// `ember run` uses the server only then.
pub fn server_configured(args: &ClientArgs) -> Result<bool, ClientError> {
    if args.api_url.as_ref().is_some_and(|u| !u.trim().is_empty()) {
        return Ok(true);
    }
    let Some(path) = config_path() else {
        return Ok(false);
    };
    Ok(read_config(&path)?
        .api_url
        .is_some_and(|u| !u.trim().is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(url: Option<&str>, key: Option<&str>) -> ClientArgs {
        ClientArgs {
            api_url: url.map(str::to_owned),
            api_key: key.map(str::to_owned),
            ca: None,
        }
    }

    #[test]
    fn flags_or_environment_win_over_the_file_and_the_file_over_defaults() {
        let file = ConfigFile {
            api_url: Some("http://file:1/".into()),
            api_key: Some("file-key".into()),
            ca: Some(PathBuf::from("/etc/ember/ca.pem")),
        };
        let e = resolve(&args(Some("http://flag:2"), Some("flag-key")), &file, None);
        assert_eq!(e.url, "http://flag:2");
        assert_eq!(e.key.as_deref(), Some("flag-key"));

        let e = resolve(&args(None, None), &file, None);
        assert_eq!(e.url, "http://file:1", "trailing slash dropped");
        assert_eq!(e.key.as_deref(), Some("file-key"));
        assert_eq!(e.ca.as_deref(), Some(Path::new("/etc/ember/ca.pem")));

        let e = resolve(&args(Some(""), None), &ConfigFile::default(), None);
        assert_eq!(e.url, DEFAULT_API_URL, "an empty value counts as unset");
        assert_eq!(e.key, None);
    }

    #[test]
    fn a_missing_key_says_how_to_set_one() {
        let e = resolve(
            &args(None, None),
            &ConfigFile::default(),
            Some(PathBuf::from("/home/x/.config/ember/config.toml")),
        );
        let msg = e.key().unwrap_err().to_string();
        assert!(msg.contains("EMBER_API_KEY"), "{msg}");
        assert!(msg.contains("--api-key"), "{msg}");
        assert!(msg.contains("/home/x/.config/ember/config.toml"), "{msg}");
    }

    #[test]
    fn config_files_are_read_and_typos_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        assert_eq!(read_config(&path).unwrap(), ConfigFile::default());
        std::fs::write(
            &path,
            "api_url = \"https://h:3\"\napi_key = \"k\"\nca = \"/etc/ember/ca.pem\"\n",
        )
        .unwrap();
        assert_eq!(
            read_config(&path).unwrap(),
            ConfigFile {
                api_url: Some("https://h:3".into()),
                api_key: Some("k".into()),
                ca: Some(PathBuf::from("/etc/ember/ca.pem")),
            }
        );
        std::fs::write(&path, "api_ur = \"http://h:3\"\n").unwrap();
        let msg = read_config(&path).unwrap_err().to_string();
        assert!(msg.contains("api_ur"), "{msg}");
        assert!(msg.contains(&path.display().to_string()), "{msg}");
    }
}
