//! Loading the configuration: embedded defaults, then the TOML file, then `REGCACHE_*`
//! environment variables (`env.rs` says which are keys); then validation, with every error
//! explained (`explain.rs`).

use super::env::{config_vars, env_to_toml};
use super::explain::{from_figment, KeyContext, Sources};
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
    #[error("config key `{key}`{context}: {message}")]
    Invalid {
        key: String,
        message: String,
        /// Which upstream, which variable or file; filled in by [`load`].
        context: KeyContext,
    },
}

pub(super) fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
        context: KeyContext::default(),
    }
}

/// The variable that names the config file; it is not a config key.
pub const CONFIG_FILE_VAR: &str = "REGCACHE_CONFIG";

/// A loaded and validated configuration, with what is needed to explain a later error
/// about it (such as `server.data_dir` turning out unusable).
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    /// `REGCACHE_*` variables left out because they name no config section; log them.
    pub ignored_env: Vec<String>,
    sources: Sources,
}

impl Loaded {
    /// Adds to a key error the upstream, variable or file it is about.
    pub fn explain(&self, e: ConfigError) -> ConfigError {
        self.sources.explain(e)
    }
}

/// Loads the embedded defaults, then `file` (if any), then `REGCACHE_*` variables from
/// `env` (pass `std::env::vars()`; tests pass their own), and validates the result.
pub fn load(
    file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Config, ConfigError> {
    load_report(file, env).map(|l| l.config)
}

/// [`load`], also returning the variables it ignored and where values came from.
pub fn load_report(
    file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Loaded, ConfigError> {
    let mut figment = Figment::new();
    let mut sources = Sources::default();
    if let Some(path) = file {
        if !path.is_file() {
            let message = if path.exists() {
                "is not a file; give --config the path of a TOML file"
            } else {
                "no such file; check the path given with --config or REGCACHE_CONFIG"
            };
            return Err(ConfigError::File {
                path: path.display().to_string(),
                message: message.into(),
            });
        }
        figment = figment.merge(Toml::file_exact(path));
        let sections = match figment.find_value("") {
            Ok(v) => v.into_dict().map(|d| d.into_keys().collect()).unwrap_or_default(),
            Err(e) => {
                return Err(ConfigError::File {
                    path: path.display().to_string(),
                    message: format!("cannot be read as TOML: {}", e.kind),
                })
            }
        };
        sources.file = Some((path.display().to_string(), sections));
    }
    // figment reads the process environment; pass our own map through a scoped provider
    // so tests stay independent of the process and of each other.
    let (vars, ignored_env) = config_vars(env);
    let env_toml = env_to_toml(&vars, &mut sources)?;
    figment = figment.merge(Toml::string(&env_toml));
    sources.upstream_names = upstream_names(&figment);
    let mut config: Config = figment.extract().map_err(|e| sources.explain(from_figment(e)))?;
    validate(&mut config).map_err(|e| sources.explain(e))?;
    Ok(Loaded {
        config,
        ignored_env,
        sources,
    })
}

/// The `name` of each `[[upstream]]` entry, by index, before extraction (for errors).
fn upstream_names(figment: &Figment) -> Vec<String> {
    let Ok(figment::value::Value::Array(_, list)) = figment.find_value("upstream") else {
        return Vec::new();
    };
    list.iter()
        .map(|u| {
            u.find_ref("name")
                .and_then(|n| n.as_str())
                .unwrap_or_default()
                .to_owned()
        })
        .collect()
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
    fn upstream_ns_and_prefetch_lists_are_validated() {
        let f = toml_file("[[upstream]]\nname = \"a\"\nurl = \"http://a\"\nns = \"Docker.IO\"\n");
        assert_eq!(
            load(Some(f.path()), env(&[])).unwrap().upstream[0].ns.as_deref(),
            Some("docker.io")
        );
        for bad in ["", "a/b", "x?y", "a b"] {
            let f = toml_file(&format!(
                "[[upstream]]\nname = \"a\"\nurl = \"http://a\"\nns = {bad:?}\n"
            ));
            assert_eq!(
                err_key(load(Some(f.path()), env(&[])).unwrap_err()),
                "upstream[0].ns",
                "{bad:?}"
            );
        }
        let f = toml_file(
            "[[prefetch]]\nlist = \"/l.toml\"\n[[prefetch]]\nlist = \"/m.toml\"\ncadence = \"6h\"\n",
        );
        let c = load(Some(f.path()), env(&[])).unwrap();
        assert_eq!(c.prefetch[0].name, "prefetch-0");
        assert_eq!(c.prefetch[0].cadence.as_secs(), 86_400);
        assert_eq!(c.prefetch[1].cadence.as_secs(), 6 * 3600);
        let f = toml_file("[[prefetch]]\nlist = \"/l.toml\"\ncadence = \"0\"\n");
        assert_eq!(
            err_key(load(Some(f.path()), env(&[])).unwrap_err()),
            "prefetch[0].cadence"
        );
        let f = toml_file(
            "[[prefetch]]\nname = \"a\"\nlist = \"/l\"\n[[prefetch]]\nname = \"a\"\nlist = \"/m\"\n",
        );
        assert_eq!(
            err_key(load(Some(f.path()), env(&[])).unwrap_err()),
            "prefetch[1].name"
        );
        let f = toml_file("[[prefetch]]\ncadence = \"1h\"\n");
        assert!(load(Some(f.path()), env(&[]))
            .unwrap_err()
            .to_string()
            .contains("list"));
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
            "max_blob_size",
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
            "ns",
            "list",
            "access",
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
