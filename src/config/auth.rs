//! `[auth]`: who may pull what. Identity sources (an htpasswd file, bearer-token files,
//! verified client certificates) and `[[auth.rule]]` entries granting `pull` on
//! `upstream/repository` globs and `admin`.
//! Only shapes and names are checked here; the files are read by the auth module, which
//! reloads them when they change.

use super::load::{invalid, ConfigError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Access control of the registry and admin APIs. With no identity source and no rule
/// (the default) everything is open, as a cache on 127.0.0.1 needs.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// An htpasswd file of `user:bcrypt-hash` lines (`htpasswd -B`), reloaded when it
    /// changes. Default: none.
    pub htpasswd_file: Option<PathBuf>,
    /// Files of `identity:token` lines; a client sends `Authorization: Bearer <token>`
    /// and is that identity. Reloaded when they change. Default: none.
    #[serde(default)]
    pub token_files: Vec<PathBuf>,
    /// Which part of a verified client certificate (`server.tls.client_ca_file`) names
    /// its identity. Default: `cn` once `[auth]` is in use (an identity file or a rule);
    /// without `[auth]` a client certificate only admits the connection.
    pub cert_identity: Option<CertIdentity>,
    /// Named groups of identities, for rules. Default: none.
    #[serde(default)]
    pub groups: BTreeMap<String, Vec<String>>,
    /// What each identity, group, or anonymous client may do. Default: none.
    #[serde(default)]
    pub rule: Vec<AuthRule>,
}

/// The part of a client certificate that names its identity (`auth.cert_identity`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CertIdentity {
    /// The subject's common name.
    Cn,
    /// The first DNS name among the subject alternative names.
    SanDns,
    /// The first e-mail address among them.
    SanEmail,
    /// The first URI among them (a SPIFFE id, say).
    SanUri,
}

/// One grant. Whoever it names (any of `identities`, members of `groups`, or anonymous
/// clients) may pull from repositories matching `pull`, and use the admin API if `admin`.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AuthRule {
    /// Identity names; `"*"` is every identity that logged in. Default: none.
    #[serde(default)]
    pub identities: Vec<String>,
    /// Group names from `[auth.groups]`. Default: none.
    #[serde(default)]
    pub groups: Vec<String>,
    /// The rule is for clients that present no credentials. Default false.
    #[serde(default)]
    pub anonymous: bool,
    /// Globs over `upstream/repository` (the upstream's configured name, the repository
    /// as that upstream knows it: `docker.io/library/alpine`): `*` within a segment, `**`
    /// across segments, `?` one character. Default: none.
    #[serde(default)]
    pub pull: Vec<String>,
    /// The admin API (`/api/v1/...`), as the admin token would. Default false.
    #[serde(default)]
    pub admin: bool,
}

impl AuthConfig {
    /// Whether clients can log in with a password or a token.
    pub fn has_logins(&self) -> bool {
        self.htpasswd_file.is_some() || !self.token_files.is_empty()
    }
}

impl super::Config {
    /// Which part of a verified client certificate names an identity; `None` when
    /// certificates name none (no `server.tls.client_ca_file`, or no `[auth]` in use).
    pub fn cert_identity(&self) -> Option<CertIdentity> {
        let client_ca = self
            .server
            .tls
            .as_ref()
            .is_some_and(|t| t.client_ca_file.is_some());
        if !client_ca {
            return None;
        }
        let in_use = self.auth.has_logins() || !self.auth.rule.is_empty();
        self.auth.cert_identity.or(in_use.then_some(CertIdentity::Cn))
    }

    /// Whether clients can be identities: logins, or client certificates that name one.
    pub fn has_identity_source(&self) -> bool {
        self.auth.has_logins() || self.cert_identity().is_some()
    }

    /// Whether access control is on: an identity source or any rule is configured.
    /// Without either, every client may pull everything (and the admin API takes only
    /// the admin token).
    pub fn auth_enabled(&self) -> bool {
        self.has_identity_source() || !self.auth.rule.is_empty()
    }
}

/// An identity or group name: what `htpasswd` and token files can hold before the `:`.
fn is_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 255 && s.bytes().all(|b| b.is_ascii_graphic() && b != b':')
}

pub(super) fn validate(config: &super::Config) -> Result<(), ConfigError> {
    let auth = &config.auth;
    if auth.cert_identity.is_some()
        && config
            .server
            .tls
            .as_ref()
            .is_none_or(|t| t.client_ca_file.is_none())
    {
        return Err(invalid(
            "auth.cert_identity",
            "needs server.tls.client_ca_file, the CA that client certificates must chain to",
        ));
    }
    if auth
        .htpasswd_file
        .as_ref()
        .is_some_and(|p| p.as_os_str().is_empty())
    {
        return Err(invalid("auth.htpasswd_file", "must not be empty"));
    }
    for (i, p) in auth.token_files.iter().enumerate() {
        if p.as_os_str().is_empty() {
            return Err(invalid(format!("auth.token_files[{i}]"), "must not be empty"));
        }
    }
    for (name, members) in &auth.groups {
        let key = format!("auth.groups.{name}");
        if !is_name(name) || name == "*" {
            return Err(invalid(
                key,
                "a group name is printable ASCII without ':' or spaces",
            ));
        }
        if let Some(m) = members.iter().find(|m| !is_name(m) || *m == "*") {
            return Err(invalid(key, format!("{m:?} is not an identity name")));
        }
    }
    for (i, rule) in auth.rule.iter().enumerate() {
        let key = |field: &str| format!("auth.rule[{i}].{field}");
        if rule.identities.is_empty() && rule.groups.is_empty() && !rule.anonymous {
            return Err(invalid(
                key("identities"),
                "a rule names identities, groups, or anonymous = true",
            ));
        }
        if let Some(id) = rule.identities.iter().find(|id| !is_name(id)) {
            return Err(invalid(
                key("identities"),
                format!("{id:?} is not an identity name"),
            ));
        }
        if let Some(g) = rule.groups.iter().find(|g| !auth.groups.contains_key(*g)) {
            return Err(invalid(
                key("groups"),
                format!("{g:?} is not defined in [auth.groups]"),
            ));
        }
        if (!rule.identities.is_empty() || !rule.groups.is_empty()) && !config.has_identity_source() {
            return Err(invalid(
                key("identities"),
                "names identities, but no identity source is configured (auth.htpasswd_file, auth.token_files, or server.tls.client_ca_file)",
            ));
        }
        if rule.anonymous && rule.admin {
            return Err(invalid(
                key("admin"),
                "anonymous clients cannot be given the admin API",
            ));
        }
        if rule.pull.is_empty() && !rule.admin {
            return Err(invalid(
                key("pull"),
                "the rule grants nothing: give it pull globs or admin = true",
            ));
        }
        for (j, glob) in rule.pull.iter().enumerate() {
            crate::glob::Glob::new(glob).map_err(|e| invalid(format!("auth.rule[{i}].pull[{j}]"), e))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::config::{load, ConfigError};
    use std::io::Write;

    fn load_toml(text: &str) -> Result<crate::config::Config, ConfigError> {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        load(Some(f.path()), Vec::new())
    }

    fn err_key(text: &str) -> String {
        match load_toml(text).unwrap_err() {
            ConfigError::Invalid { key, .. } => key,
            other => panic!("unexpected {other}"),
        }
    }

    #[test]
    fn rules_are_checked_and_errors_name_the_key() {
        let src = "[auth]\nhtpasswd_file = \"/etc/regcache/htpasswd\"\n";
        assert_eq!(
            err_key(&format!("{src}[[auth.rule]]\npull = [\"**\"]\n")),
            "auth.rule[0].identities"
        );
        assert_eq!(
            err_key(&format!(
                "{src}[[auth.rule]]\nidentities = [\"a\"]\npull = [\"\"]\n"
            )),
            "auth.rule[0].pull[0]"
        );
        assert_eq!(
            err_key(&format!("{src}[[auth.rule]]\nidentities = [\"a\"]\n")),
            "auth.rule[0].pull"
        );
        assert_eq!(
            err_key(&format!(
                "{src}[[auth.rule]]\ngroups = [\"ci\"]\npull = [\"**\"]\n"
            )),
            "auth.rule[0].groups"
        );
        assert_eq!(
            err_key(&format!("{src}[[auth.rule]]\nanonymous = true\nadmin = true\n")),
            "auth.rule[0].admin"
        );
        assert_eq!(
            err_key(&format!("{src}[auth.groups]\n\"a:b\" = [\"x\"]\n")),
            "auth.groups.a:b"
        );
        assert_eq!(
            err_key("[[auth.rule]]\nidentities = [\"a\"]\npull = [\"**\"]\n"),
            "auth.rule[0].identities"
        );
        let c = load_toml(&format!(
            "{src}[auth.groups]\nci = [\"runner-1\", \"runner-2\"]\n\
             [[auth.rule]]\ngroups = [\"ci\"]\npull = [\"docker.io/library/*\", \"ghcr/acme/**\"]\n\
             [[auth.rule]]\nanonymous = true\npull = [\"docker.io/library/alpine\"]\n"
        ))
        .unwrap();
        assert!(c.auth_enabled() && c.has_identity_source());
        assert_eq!(c.auth.rule.len(), 2);
    }

    #[test]
    fn client_certificates_name_identities_once_auth_is_in_use() {
        let tls = "[server.tls]\ncert_file = \"/c\"\nkey_file = \"/k\"\nclient_ca_file = \"/ca\"\n";
        // A client CA alone admits connections; it makes no identities.
        let c = load_toml(tls).unwrap();
        assert_eq!(c.cert_identity(), None);
        assert!(!c.auth_enabled());
        // With a rule (or an identity file) certificates name identities, by CN unless told.
        let rule = "[[auth.rule]]\nidentities = [\"node-1\"]\npull = [\"**\"]\n";
        let c = load_toml(&format!("{tls}{rule}")).unwrap();
        assert_eq!(c.cert_identity(), Some(super::CertIdentity::Cn));
        assert!(c.has_identity_source() && c.auth_enabled() && !c.auth.has_logins());
        let c = load_toml(&format!("{tls}[auth]\ncert_identity = \"san_uri\"\n")).unwrap();
        assert_eq!(c.cert_identity(), Some(super::CertIdentity::SanUri));
        assert!(c.auth_enabled());
        // Without a client CA there is nothing to name.
        assert_eq!(err_key("[auth]\ncert_identity = \"cn\"\n"), "auth.cert_identity");
        assert!(load_toml(&format!("{tls}[auth]\ncert_identity = \"serial\"\n")).is_err());
    }

    #[test]
    fn anonymous_rules_alone_restrict_without_logins() {
        let c = load_toml("[[auth.rule]]\nanonymous = true\npull = [\"docker.io/**\"]\n").unwrap();
        assert!(c.auth_enabled());
        assert!(!c.has_identity_source());
        let open = load(None, Vec::new()).unwrap();
        assert!(!open.auth_enabled());
    }
}
