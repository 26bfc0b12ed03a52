//! Settings common to every service, and the loader each service's own
//! `Settings` goes through.
//!
//! Precedence: defaults in code, then a TOML file named by
//! `METERLINE_CONFIG` (if set), then environment variables. Variables are
//! `METERLINE_<SERVICE>_<FIELD>` for a service's own fields (nested fields
//! joined with `__`), and `METERLINE_NATS_<FIELD>` for the bus connection
//! every service shares. Unknown fields are errors, so a typo is caught at
//! start rather than silently ignored.

use std::fmt;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// A value that must not be printed: shown as `***` in logs and debug output.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() { "\"\"" } else { "\"***\"" })
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // Serialized for the defaults layer of the loader: keeps the value.
        s.serialize_str(&self.0)
    }
}

/// How a service reaches NATS.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsSettings {
    /// Server URL(s), comma separated.
    pub url: String,
    /// User name from `nats.conf` (each service has its own).
    pub user: Option<String>,
    /// Password of `user`.
    pub password: Option<Secret>,
    /// How long a request to another service may take, in milliseconds.
    pub request_timeout_ms: u64,
    /// Replicas of every stream and bucket this service provisions: 1 on a
    /// single server, 3 in a JetStream cluster. Changing it updates existing
    /// streams at the next start.
    pub stream_replicas: usize,
}

impl NatsSettings {
    /// Field names, as environment variables take them.
    pub const FIELDS: [&'static str; 5] = [
        "url",
        "user",
        "password",
        "request_timeout_ms",
        "stream_replicas",
    ];
}

impl Default for NatsSettings {
    fn default() -> Self {
        NatsSettings {
            url: "nats://127.0.0.1:4222".into(),
            user: None,
            password: None,
            request_timeout_ms: 10_000,
            stream_replicas: 1,
        }
    }
}

/// Loads a service's settings. `service` is the upper-case name used in
/// environment variables (`GATEWAY`, `ENTITIES`, ...). `T` must have a field
/// `nats: NatsSettings`.
pub fn load<T>(service: &str) -> anyhow::Result<T>
where
    T: Default + Serialize + DeserializeOwned,
{
    let mut fig = Figment::from(Serialized::defaults(T::default()));
    if let Ok(path) = std::env::var("METERLINE_CONFIG") {
        // One file for all services: each reads its own `[<service>]` table
        // (with its bus connection in `[<service>.nats]`).
        let file = Figment::from(Toml::file_exact(path));
        fig = fig.merge(file.focus(&service.to_ascii_lowercase()));
    }
    fig = fig
        // Only the connection's own fields: nats.conf reads per-service
        // passwords from `METERLINE_NATS_PASSWORD_<USER>`, which are not
        // settings of any one service.
        .merge(
            Env::prefixed("METERLINE_NATS_")
                .only(&NatsSettings::FIELDS)
                .map(|k| format!("nats.{k}").into()),
        )
        .merge(Env::prefixed(&format!("METERLINE_{service}_")).split("__"));
    Ok(fig.extract()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default, Serialize, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct Probe {
        nats: NatsSettings,
        port: u16,
    }

    #[test]
    #[allow(clippy::result_large_err)]
    fn environment_overrides_defaults_and_foreign_nats_variables_are_ignored() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("METERLINE_NATS_URL", "nats://bus:4222");
            jail.set_env("METERLINE_NATS_STREAM_REPLICAS", "3");
            jail.set_env(
                "METERLINE_NATS_PASSWORD_GATEWAY",
                "for nats.conf, not for us",
            );
            jail.set_env("METERLINE_PROBE_PORT", "8089");
            let s: Probe = load("PROBE").map_err(|e| e.to_string())?;
            assert_eq!(s.nats.url, "nats://bus:4222");
            assert_eq!(s.nats.stream_replicas, 3);
            assert_eq!(s.port, 8089);
            jail.set_env("METERLINE_PROBE_PROT", "1");
            assert!(
                load::<Probe>("PROBE").is_err(),
                "a misspelt setting is an error"
            );
            Ok(())
        });
    }

    #[test]
    fn secrets_do_not_print() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), "\"***\"");
        assert_eq!(s.expose(), "hunter2");
    }
}
