//! Loading and validating the configuration.

use super::validate::validate;
use super::Config;
use figment::providers::{Format, Toml};
use figment::Figment;
use std::path::Path;

/// A configuration that cannot be used. `key` is the dotted config key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {message}")]
    File { path: String, message: String },
    #[error("config key `{key}`: {message}")]
    Invalid { key: String, message: String },
}

pub(super) fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// Loads the embedded defaults, then `file` (if any), then `REGCACHE_*` variables from
/// `env` (pass `std::env::vars()`; tests pass their own), and validates the result.
pub fn load(
    file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Config, ConfigError> {
    let mut figment = Figment::new();
    if let Some(path) = file {
        if !path.is_file() {
            return Err(ConfigError::File {
                path: path.display().to_string(),
                message: "no such file".into(),
            });
        }
        figment = figment.merge(Toml::file_exact(path));
    }
    // figment reads the process environment; pass our own map through a scoped provider
    // so tests stay independent of the process and of each other.
    let vars: Vec<(String, String)> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with("REGCACHE_"))
        .collect();
    let env_toml = env_to_toml(&vars)?;
    figment = figment.merge(Toml::string(&env_toml));
    let mut config: Config = figment.extract().map_err(from_figment)?;
    validate(&mut config)?;
    Ok(config)
}

/// Turns `REGCACHE_A__B=v` variables into a TOML document `[a] b = v`, parsing each value
/// as TOML when it parses and as a string otherwise (figment's own rule).
fn env_to_toml(vars: &[(String, String)]) -> Result<String, ConfigError> {
    let mut root = toml::Table::new();
    for (name, raw) in vars {
        let Some(rest) = name.strip_prefix("REGCACHE_") else {
            continue;
        };
        let path: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
        if path.iter().any(String::is_empty) {
            return Err(invalid(
                name.clone(),
                "empty key segment in environment variable name",
            ));
        }
        let value = parse_env_value(raw);
        let mut table = &mut root;
        for (i, segment) in path.iter().enumerate() {
            if i + 1 == path.len() {
                table.insert(segment.clone(), value.clone());
                break;
            }
            let entry = table
                .entry(segment.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            table = entry
                .as_table_mut()
                .ok_or_else(|| invalid(path[..=i].join("."), format!("{name} sets a key below a value")))?;
        }
    }
    Ok(toml::to_string(&root).unwrap_or_default())
}

fn parse_env_value(raw: &str) -> toml::Value {
    let doc = format!("v = {raw}");
    match doc.parse::<toml::Table>() {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(raw.to_owned())),
        Err(_) => toml::Value::String(raw.to_owned()),
    }
}

fn from_figment(err: figment::Error) -> ConfigError {
    let mut messages = Vec::new();
    let mut key = String::new();
    for e in err {
        let path = e.path.join(".");
        if key.is_empty() {
            key = if path.is_empty() {
                "(top level)".into()
            } else {
                path.clone()
            };
        }
        let source = e
            .metadata
            .as_ref()
            .and_then(|m| m.source.as_ref())
            .map(|s| format!(" (in {s})"))
            .unwrap_or_default();
        messages.push(format!("{}{source}", e.kind));
    }
    invalid(key, messages.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DOCKER_HUB_URL;
    use std::io::Write;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn toml_file(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    fn err_key(e: ConfigError) -> String {
        match e {
            ConfigError::Invalid { key, .. } => key,
            other => panic!("unexpected {other}"),
        }
    }

    #[test]
    fn defaults_mirror_docker_hub() {
        let c = load(None, env(&[])).unwrap();
        assert_eq!(c.server.listen, "127.0.0.1:5000");
        assert_eq!(c.server.data_dir, Path::new("./regcache-data"));
        assert_eq!(c.upstream.len(), 1);
        assert_eq!(c.upstream[0].url, DOCKER_HUB_URL);
        assert!(c.upstream[0].default);
        assert_eq!(c.proxy.ttl.as_secs(), 7 * 86_400);
        assert!(c.storage.delete.enabled);
    }

    #[test]
    fn the_issue_example_loads_as_written() {
        let f = toml_file(
            r#"
            [server]
            listen = "0.0.0.0:5000"
            data_dir = "/var/lib/regcache"
            [storage]
            backend = "filesystem"          # filesystem | s3 | gcs | memory
            [storage.delete]
            enabled = true
            [proxy]
            ttl = "7d"                      # "0" = never expire
            [[upstream]]
            name = "internal"
            url = "http://registry.internal:5000"
            default = true
            "#,
        );
        let c = load(Some(f.path()), env(&[])).unwrap();
        assert_eq!(c.upstream[0].name, "internal");
        assert_eq!(c.server.data_dir, Path::new("/var/lib/regcache"));
    }

    #[test]
    fn environment_overrides_nested_keys() {
        let c = load(
            None,
            env(&[
                ("REGCACHE_STORAGE__DELETE__ENABLED", "false"),
                ("REGCACHE_PROXY__TTL", "15s"),
                ("REGCACHE_SERVER__LISTEN", "127.0.0.1:6000"),
                ("OTHER", "ignored"),
            ]),
        )
        .unwrap();
        assert!(!c.storage.delete.enabled);
        assert_eq!(c.proxy.ttl.as_secs(), 15);
        assert_eq!(c.server.listen, "127.0.0.1:6000");
    }

    #[test]
    fn errors_name_the_key() {
        let e = load(None, env(&[("REGCACHE_PROXY__TTL", "soon")])).unwrap_err();
        assert_eq!(err_key(e), "proxy.ttl");
        let e = load(None, env(&[("REGCACHE_PROXY__TTLL", "1d")])).unwrap_err();
        assert!(e.to_string().contains("ttll"), "{e}");
        let e = load(None, env(&[("REGCACHE_SERVER__LISTEN", "nowhere")])).unwrap_err();
        assert_eq!(err_key(e), "server.listen");
        let e = load(None, env(&[("REGCACHE_STORAGE__BACKEND", "s3")])).unwrap_err();
        assert_eq!(err_key(e), "storage.s3");
        let f = toml_file("[[upstream]]\nname = \"Bad Name\"\nurl = \"http://x\"\n");
        assert_eq!(
            err_key(load(Some(f.path()), env(&[])).unwrap_err()),
            "upstream[0].name"
        );
        let f = toml_file("[[upstream]]\nname = \"a\"\nurl = \"ftp://x\"\n");
        assert_eq!(
            err_key(load(Some(f.path()), env(&[])).unwrap_err()),
            "upstream[0].url"
        );
        let f = toml_file(
            "[[upstream]]\nname = \"a\"\nurl = \"http://a\"\ndefault = true\n[[upstream]]\nname = \"b\"\nurl = \"http://b\"\ndefault = true\n",
        );
        assert_eq!(
            err_key(load(Some(f.path()), env(&[])).unwrap_err()),
            "upstream[1].default"
        );
    }

    #[test]
    fn connection_limits_must_be_positive() {
        for (var, key) in [
            ("REGCACHE_SERVER__HEADER_TIMEOUT", "server.header_timeout"),
            ("REGCACHE_SERVER__IDLE_TIMEOUT", "server.idle_timeout"),
            ("REGCACHE_SERVER__SEND_TIMEOUT", "server.send_timeout"),
            ("REGCACHE_SERVER__MAX_CONNECTIONS", "server.max_connections"),
        ] {
            let e = load(None, env(&[(var, "0")])).unwrap_err();
            assert_eq!(err_key(e), key);
        }
        let c = load(None, env(&[("REGCACHE_SERVER__SEND_TIMEOUT", "2m")])).unwrap();
        assert_eq!(c.server.send_timeout.as_secs(), 120);
    }

    #[test]
    fn client_auth_needs_a_client_ca() {
        let f = toml_file(
            "[server.tls]\ncert_file = \"c.pem\"\nkey_file = \"k.pem\"\nclient_auth = \"optional\"\n",
        );
        assert_eq!(
            err_key(load(Some(f.path()), env(&[])).unwrap_err()),
            "server.tls.client_auth"
        );
        let f =
            toml_file("[server.tls]\ncert_file = \"c.pem\"\nkey_file = \"k.pem\"\nclient_auth = \"maybe\"\n");
        assert!(load(Some(f.path()), env(&[])).is_err());
    }

    #[test]
    fn password_file_is_read_and_redacted() {
        let secret = toml_file("s3cr3t\n");
        let f = toml_file(&format!(
            "[[upstream]]\nname = \"a\"\nurl = \"http://a\"\nusername = \"u\"\npassword_file = {:?}\n",
            secret.path()
        ));
        let c = load(Some(f.path()), env(&[])).unwrap();
        let password = c.upstream[0].password.as_ref().unwrap();
        assert_eq!(password.expose(), "s3cr3t");
        assert!(!toml::to_string(&c).unwrap().contains("s3cr3t"));
    }

    #[test]
    fn numeric_secret_from_env_stays_text() {
        let c = load(
            None,
            env(&[(
                "REGCACHE_UPSTREAM",
                r#"[{name="a",url="http://a",username="u",password="x"}]"#,
            )]),
        )
        .unwrap();
        assert_eq!(c.upstream[0].name, "a");
        let f =
            toml_file("[[upstream]]\nname = \"a\"\nurl = \"http://a\"\nusername = \"u\"\npassword = 12345\n");
        let c = load(Some(f.path()), env(&[])).unwrap();
        assert_eq!(c.upstream[0].password.as_ref().unwrap().expose(), "12345");
    }

    #[test]
    fn example_config_documents_the_defaults_and_every_key() {
        let path = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.toml"));
        let example = load(Some(path), env(&[])).unwrap();
        let defaults = load(None, env(&[])).unwrap();
        assert_eq!(
            toml::to_string(&example).unwrap(),
            toml::to_string(&defaults).unwrap()
        );
        let text = std::fs::read_to_string(path).unwrap();
        let keys = [
            "listen",
            "data_dir",
            "shutdown_grace",
            "header_timeout",
            "idle_timeout",
            "send_timeout",
            "max_connections",
            "cert_file",
            "key_file",
            "client_ca_file",
            "client_auth",
            "backend",
            "fsync",
            "enabled",
            "workers",
            "retry_initial",
            "retry_max",
            "max_size",
            "low_watermark_percent",
            "reconcile_interval",
            "reconcile_grace",
            "bucket",
            "region",
            "endpoint",
            "allow_http",
            "access_key_id",
            "secret_access_key",
            "secret_access_key_file",
            "prefix",
            "service_account_path",
            "service_account_key",
            "base_url",
            "ttl",
            "offline",
            "revalidate_after",
            "revalidate_timeout",
            "connect_timeout",
            "read_timeout",
            "name",
            "url",
            "default",
            "username",
            "password",
            "password_file",
            "level",
            "format",
            "token",
            "token_file",
            "delete_workers",
            "max_attempts",
            "max_run_time",
            "delete_batch",
            "stale_after",
            "sweep_interval",
            "repositories",
            "keep_n",
            "older_than",
            "name_regex_delete",
            "name_regex_keep",
            "cadence",
            "htpasswd_file",
            "token_files",
            "cert_identity",
            "identities",
            "groups",
            "anonymous",
            "pull",
            "admin",
        ];
        for key in keys {
            assert!(
                text.contains(&format!("{key} = ")),
                "config.example.toml documents `{key}`"
            );
        }
    }

    #[test]
    fn cleanup_policies_are_validated() {
        let f = toml_file("[[cleanup.policy]]\nrepositories = \"hub/**\"\nname_regex_keep = \"(\"\n");
        assert_eq!(
            err_key(load(Some(f.path()), env(&[])).unwrap_err()),
            "cleanup.policy[0].name_regex_keep"
        );
        let f = toml_file("[[cleanup.policy]]\nrepositories = \"\"\n");
        assert_eq!(
            err_key(load(Some(f.path()), env(&[])).unwrap_err()),
            "cleanup.policy[0].repositories"
        );
        let f = toml_file("[[cleanup.policy]]\nrepositories = \"hub/*\"\nkeep_n = 3\nolder_than = \"30d\"\n");
        let c = load(Some(f.path()), env(&[])).unwrap();
        assert_eq!(c.cleanup.policy[0].name, "policy-0");
        assert_eq!(c.cleanup.policy[0].name_regex_delete, ".*");
        let e = load(None, env(&[("REGCACHE_ADMIN__TOKEN", "short")])).unwrap_err();
        assert_eq!(err_key(e), "admin.token");
    }

    #[test]
    fn missing_file_is_an_error() {
        let e = load(Some(Path::new("/nonexistent/regcache.toml")), env(&[])).unwrap_err();
        assert!(matches!(e, ConfigError::File { .. }));
    }
}
