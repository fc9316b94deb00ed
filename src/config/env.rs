//! `REGCACHE_*` environment variables: which of them set config keys, and the TOML they
//! amount to. Variables that name no config section (such as the `REGCACHE_PORT=tcp://…`
//! Kubernetes injects for a Service named `regcache`) are left out and reported, not
//! refused.

use super::explain::{key_name, Sources};
use super::load::{invalid, ConfigError, CONFIG_FILE_VAR};
use super::Config;
use figment::error::Kind;
use figment::providers::Serialized;
use figment::Figment;
use std::sync::OnceLock;

/// Splits `REGCACHE_*` variables into those that name a config section (used) and the
/// others (ignored): a Service named `regcache` makes Kubernetes set `REGCACHE_PORT`,
/// `REGCACHE_SERVICE_HOST`, `REGCACHE_PORT_5000_TCP_ADDR`… in every pod of its namespace.
/// A typo below a real section (`REGCACHE_STORAGE__DELET__ENABLED`) is kept, so that it
/// fails with the key named.
pub(super) fn config_vars(
    env: impl IntoIterator<Item = (String, String)>,
) -> (Vec<(String, String)>, Vec<String>) {
    let sections = sections();
    let mut used = Vec::new();
    let mut ignored = Vec::new();
    for (name, value) in env {
        let Some(rest) = name.strip_prefix("REGCACHE_") else {
            continue;
        };
        if name == CONFIG_FILE_VAR {
            continue;
        }
        let first = rest.split("__").next().unwrap_or_default().to_ascii_lowercase();
        if sections.is_empty() || sections.contains(&first.as_str()) {
            used.push((name, value));
        } else {
            ignored.push(name);
        }
    }
    used.sort();
    ignored.sort();
    (used, ignored)
}

/// The top-level sections of the config, as serde knows them: deserializing a key that
/// cannot be a field makes `deny_unknown_fields` list the fields that exist. Empty if it
/// unexpectedly does not, and then no variable is ignored.
fn sections() -> &'static [&'static str] {
    static SECTIONS: OnceLock<&'static [&'static str]> = OnceLock::new();
    SECTIONS.get_or_init(|| {
        let probe = Figment::from(Serialized::defaults(std::collections::BTreeMap::from([(
            "-not-a-section-",
            0,
        )])));
        match probe.extract::<Config>() {
            Ok(_) => &[],
            Err(e) => e
                .into_iter()
                .find_map(|e| match e.kind {
                    Kind::UnknownField(_, expected) => Some(expected),
                    _ => None,
                })
                .unwrap_or(&[]),
        }
    })
}

/// Turns `REGCACHE_A__B=v` variables into a TOML document `[a] b = v`, parsing each value
/// as TOML when it parses and as a string otherwise (figment's own rule), and records
/// which variable set which key.
pub(super) fn env_to_toml(vars: &[(String, String)], sources: &mut Sources) -> Result<String, ConfigError> {
    let mut root = toml::Table::new();
    for (name, raw) in vars {
        let Some(rest) = name.strip_prefix("REGCACHE_") else {
            continue;
        };
        let path: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
        if path.iter().any(String::is_empty) {
            return Err(invalid(
                name.clone(),
                format!(
                    "environment variable {name} has an empty key between `__` separators; \
                     write REGCACHE_SECTION__KEY, e.g. REGCACHE_PROXY__TTL"
                ),
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
            table = entry.as_table_mut().ok_or_else(|| {
                invalid(
                    key_name(&path[..=i]),
                    format!("{name} sets a key below it, but it is a value, not a table"),
                )
            })?;
        }
        sources.env.push((path, name.clone()));
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

#[cfg(test)]
mod tests {
    use super::super::load::{load, load_report};
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// What Kubernetes injects for a Service named `regcache` (issue 11, point 6).
    const KUBERNETES: [(&str, &str); 7] = [
        ("REGCACHE_PORT", "tcp://10.0.0.1:5000"),
        ("REGCACHE_SERVICE_HOST", "10.0.0.1"),
        ("REGCACHE_SERVICE_PORT", "5000"),
        ("REGCACHE_SERVICE_PORT_HTTP", "5000"),
        ("REGCACHE_PORT_5000_TCP", "tcp://10.0.0.1:5000"),
        ("REGCACHE_PORT_5000_TCP_ADDR", "10.0.0.1"),
        ("REGCACHE_PORT_5000_TCP_PROTO", "tcp"),
    ];

    #[test]
    fn variables_that_name_no_section_are_ignored_and_reported() {
        let mut vars = KUBERNETES.to_vec();
        vars.push(("REGCACHE_PROXY__TTL", "1d"));
        vars.push(("REGCACHE_CONFIG", "/etc/regcache.toml"));
        let loaded = load_report(None, env(&vars)).unwrap();
        assert_eq!(
            loaded.config.proxy.ttl.as_secs(),
            86_400,
            "a real key still applies"
        );
        let mut expected: Vec<String> = KUBERNETES.iter().map(|(k, _)| k.to_string()).collect();
        expected.sort();
        assert_eq!(loaded.ignored_env, expected);
        assert!(
            !loaded.ignored_env.iter().any(|v| v == CONFIG_FILE_VAR),
            "REGCACHE_CONFIG names the file: neither a key nor ignored"
        );
    }

    #[test]
    fn a_typo_inside_a_section_is_still_an_error_naming_key_and_variable() {
        let mut vars = KUBERNETES.to_vec();
        vars.push(("REGCACHE_STORAGE__DELET__ENABLED", "false"));
        let e = load(None, env(&vars)).unwrap_err();
        let text = e.to_string();
        match e {
            ConfigError::Invalid { key, .. } => assert_eq!(key, "storage.delet"),
            other => panic!("unexpected {other}"),
        }
        for needle in ["REGCACHE_STORAGE__DELET__ENABLED", "did you mean `delete`?"] {
            assert!(text.contains(needle), "{needle:?} in {text}");
        }
    }

    /// The sections come from serde's field list; the probe must find every one.
    #[test]
    fn every_top_level_section_is_known() {
        let defaults = toml::Table::try_from(load(None, env(&[])).unwrap()).unwrap();
        assert!(!sections().is_empty());
        for key in defaults.keys() {
            assert!(
                sections().contains(&key.as_str()),
                "{key} missing from {:?}",
                sections()
            );
        }
    }
}
