//! One configuration loader for the daemons and stdctl: a TOML file, then the process's environment overrides `PREFIX_KEY` (nested keys joined with `__`: `STD_ADMIN__LISTEN` is `admin.listen`), deserialised into the program's typed configuration; an error names the file and, when an override may be the cause, the variable.

use std::collections::HashMap;
use std::path::Path;

use serde::de::DeserializeOwned;

/// A configuration that cannot be used. `field` names the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read or parsed, a key has the wrong type or is
    /// unknown (the text names the file and any environment override involved).
    #[error("{0}")]
    Load(String),
    /// A key has an invalid value.
    #[error("{field}: {message}")]
    Invalid {
        /// The key (`port[2].tms`, `admin.token`, …).
        field: String,
        /// What is wrong.
        message: String,
    },
}

/// An [`ConfigError::Invalid`] for `field`.
pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

/// A program's configuration: read from a TOML file with `PREFIX_*`
/// environment overrides, then finished (relative paths resolved against
/// the file's directory, what types cannot check checked).
pub trait Settings: DeserializeOwned {
    /// The environment variables' prefix (`STD`, `TMD`, `STDCTL`).
    const PREFIX: &'static str;

    /// After deserialising: `base` is the configuration file's directory.
    fn finish(self, base: &Path) -> Result<Self, ConfigError>;

    /// Reads `path` with the process's overrides.
    fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::load_with_env(path, env_overrides(Self::PREFIX))
    }

    /// [`Settings::load`] with the environment given instead of read from
    /// the process (variables without the prefix are ignored).
    fn load_with_env(path: &Path, env: HashMap<String, String>) -> Result<Self, ConfigError> {
        let raw: Self = load_with_env(path, Self::PREFIX, env)?;
        raw.finish(path.parent().unwrap_or(Path::new(".")))
    }
}

/// Reads `path` (TOML) with the process's `PREFIX_*` environment overrides.
pub fn load<T: DeserializeOwned>(path: &Path, prefix: &str) -> Result<T, ConfigError> {
    load_with_env(path, prefix, env_overrides(prefix))
}

/// [`load`] with the environment given instead of read from the process
/// (variables without the prefix are ignored).
pub fn load_with_env<T: DeserializeOwned>(
    path: &Path,
    prefix: &str,
    env: HashMap<String, String>,
) -> Result<T, ConfigError> {
    config::Config::builder()
        .add_source(config::File::from(path).format(config::FileFormat::Toml))
        .add_source(environment(prefix, &env))
        .build()
        .and_then(|c| c.try_deserialize())
        .map_err(|e| {
            let e = e.to_string();
            ConfigError::Load(format!(
                "{}: {e}{}",
                path.display(),
                env_hint(prefix, &e, &env)
            ))
        })
}

/// The process's environment variables that start with `prefix` and `_`
/// (any case); variables whose name or value is not UTF-8 are skipped.
pub fn env_overrides(prefix: &str) -> HashMap<String, String> {
    std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .filter(|(k, _)| strip_prefix(prefix, k).is_some())
        .collect()
}

/// The key part of variable `name`, if it has the prefix.
fn strip_prefix<'a>(prefix: &str, name: &'a str) -> Option<&'a str> {
    let head = name.get(..prefix.len() + 1)?;
    let rest = name.get(prefix.len() + 1..)?;
    (head.eq_ignore_ascii_case(&format!("{prefix}_")) && !rest.is_empty()).then_some(rest)
}

/// The `config` source of the overrides in `env`.
fn environment(prefix: &str, env: &HashMap<String, String>) -> config::Environment {
    config::Environment::with_prefix(prefix)
        .prefix_separator("_")
        .separator("__")
        .try_parsing(true)
        .source(Some(env.clone()))
}

/// Which overrides a load error may come from: those setting a key the
/// error names, else all of them; with how an override is written.
fn env_hint(prefix: &str, error: &str, env: &HashMap<String, String>) -> String {
    // What the error is about, before the list of keys it expected.
    let subject = error.split(", expected").next().unwrap_or(error);
    let mut set: Vec<(bool, String)> = env
        .keys()
        .filter_map(|name| {
            let key = strip_prefix(prefix, name)?
                .to_lowercase()
                .replace("__", ".");
            let named = error.contains(&format!("key `{key}`"))
                || std::iter::once(key.as_str())
                    .chain(key.split('.'))
                    .any(|k| subject.contains(&format!("`{k}`")));
            Some((named, format!("{name} sets `{key}`")))
        })
        .collect();
    let named = set.iter().any(|(named, _)| *named);
    if named {
        set.retain(|(named, _)| *named);
    }
    if set.is_empty() {
        return String::new();
    }
    let mut set: Vec<String> = set.into_iter().map(|(_, s)| s).collect();
    set.sort();
    format!(
        " ({}: {}; an override is {prefix}_ and the key, nested keys joined with `__`, e.g. {prefix}_ADMIN__LISTEN)",
        if named {
            "from the environment"
        } else {
            "environment overrides in effect"
        },
        set.join(", ")
    )
}
