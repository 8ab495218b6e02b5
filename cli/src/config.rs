//! The user's config file, shared by the admin commands and the agent.
//!
//! Lives at `$BURROW_CONFIG`, else `$XDG_CONFIG_HOME/burrow/config.toml`, else
//! `~/.config/burrow/config.toml`. It holds secrets (API token, agent token), so it is written
//! with mode 0600 and its directory with 0700.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

/// Environment variable naming an explicit config file path.
pub(crate) const ENV_CONFIG: &str = "BURROW_CONFIG";

/// Everything `burrow` remembers between runs.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub(crate) struct UserConfig {
    /// Control-plane API address written by `burrow login` (`http://host:port`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) api: Option<String>,
    /// API token written by `burrow login`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) token: Option<String>,
    /// Agent token written by `burrow authtoken add`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) authtoken: Option<String>,
    /// Default edge address for the agent (`host:port`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) edge: Option<String>,
}

/// The config file path in force (it may not exist yet).
pub(crate) fn path() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os(ENV_CONFIG) {
        return Ok(PathBuf::from(p));
    }
    if let Some(dir) = std::env::var_os("XDG_CONFIG_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir).join("burrow").join("config.toml"));
    }
    let home = std::env::var_os("HOME").filter(|h| !h.is_empty()).context(
        "cannot find the config file: neither BURROW_CONFIG, XDG_CONFIG_HOME nor HOME is set",
    )?;
    Ok(PathBuf::from(home)
        .join(".config")
        .join("burrow")
        .join("config.toml"))
}

/// Loads the config file; a missing file is an empty config.
pub(crate) fn load() -> anyhow::Result<UserConfig> {
    load_from(&path()?)
}

/// Loads a config file from `path`; a missing file is an empty config.
pub(crate) fn load_from(path: &Path) -> anyhow::Result<UserConfig> {
    match std::fs::read_to_string(path) {
        Ok(text) => toml::from_str(&text)
            .with_context(|| format!("config file {} is not valid", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(UserConfig::default()),
        Err(e) => Err(e).with_context(|| format!("cannot read config file {}", path.display())),
    }
}

/// Writes the config file with mode 0600 (its directory 0700), replacing it atomically.
pub(crate) fn save(config: &UserConfig) -> anyhow::Result<PathBuf> {
    let path = path()?;
    save_to(&path, config)?;
    Ok(path)
}

/// Writes `config` to `path` with mode 0600, replacing it atomically.
pub(crate) fn save_to(path: &Path, config: &UserConfig) -> anyhow::Result<()> {
    use std::io::Write as _;
    #[cfg(unix)]
    use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};

    let text = toml::to_string_pretty(config).context("cannot encode the config")?;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    builder.mode(0o700);
    builder
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let tmp = dir.join(format!(".config.toml.{}", std::process::id()));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    options.mode(0o600);
    let mut file = options
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Largest token file accepted: tokens are under 200 bytes, so anything bigger is the wrong
/// file (and reading it whole could exhaust memory, e.g. `--token-file /dev/zero`).
pub(crate) const MAX_TOKEN_FILE_BYTES: u64 = 16 * 1024;

/// Reads a secret from a file given with `--token-file` (`-` is standard input), trimming
/// surrounding whitespace. Reads at most [`MAX_TOKEN_FILE_BYTES`].
pub(crate) fn read_token_file(path: &Path) -> anyhow::Result<String> {
    use std::io::Read as _;

    let mut bytes = Vec::new();
    let limit = MAX_TOKEN_FILE_BYTES + 1;
    if path == Path::new("-") {
        std::io::stdin()
            .lock()
            .take(limit)
            .read_to_end(&mut bytes)
            .context("cannot read the token from standard input")?;
    } else {
        std::fs::File::open(path)
            .and_then(|f| f.take(limit).read_to_end(&mut bytes))
            .with_context(|| format!("cannot read token file {}", path.display()))?;
    }
    let name = if path == Path::new("-") {
        "standard input".to_owned()
    } else {
        format!("token file {}", path.display())
    };
    anyhow::ensure!(
        bytes.len() as u64 <= MAX_TOKEN_FILE_BYTES,
        "{name} is larger than {MAX_TOKEN_FILE_BYTES} bytes: not a token"
    );
    let text = String::from_utf8(bytes).map_err(|_| anyhow::anyhow!("{name} is not text"))?;
    let token = text.trim().to_owned();
    anyhow::ensure!(!token.is_empty(), "{name} is empty");
    Ok(token)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn the_config_file_round_trips_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("config.toml");
        let cfg = UserConfig {
            api: Some("http://127.0.0.1:1".into()),
            token: Some("brw_api_x".into()),
            authtoken: None,
            edge: None,
        };
        save_to(&path, &cfg).unwrap();
        assert_eq!(load_from(&path).unwrap(), cfg);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
    }

    #[test]
    fn token_files_are_trimmed_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("t");
        std::fs::write(&good, "  brw_api_x\n").unwrap();
        assert_eq!(read_token_file(&good).unwrap(), "brw_api_x");
        let big = dir.path().join("big");
        std::fs::write(&big, vec![b'a'; MAX_TOKEN_FILE_BYTES as usize + 1]).unwrap();
        assert!(read_token_file(&big).is_err());
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").unwrap();
        assert!(read_token_file(&empty).is_err());
    }

    #[test]
    fn a_missing_config_file_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            load_from(&dir.path().join("nope.toml")).unwrap(),
            UserConfig::default()
        );
    }
}
