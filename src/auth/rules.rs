//! `[[auth.rule]]` compiled: who may pull which `upstream/repository`, and who has the
//! admin API. Group names are expanded into identities here, once. Pure.

use crate::config::Config;
use crate::glob::Glob;
use std::collections::HashSet;

/// Who a rule is about, as far as rules care.
#[derive(Debug, Clone, Copy)]
pub(super) enum Subject<'a> {
    Anonymous,
    Identity(&'a str),
}

#[derive(Debug)]
struct Rule {
    identities: HashSet<String>,
    /// `identities = ["*"]`: every identity that logged in.
    any_identity: bool,
    anonymous: bool,
    pull: Vec<Glob>,
    admin: bool,
}

impl Rule {
    fn applies_to(&self, who: Subject<'_>) -> bool {
        match who {
            Subject::Anonymous => self.anonymous,
            Subject::Identity(name) => self.any_identity || self.identities.contains(name),
        }
    }
}

#[derive(Debug)]
pub(super) struct Rules {
    /// Off (no identity source, no rule): everyone may pull everything.
    enabled: bool,
    rules: Vec<Rule>,
}

impl Rules {
    /// `config` was validated by `config::load`, so every glob compiles and every group
    /// exists; a glob that fails anyway is left out (grants nothing).
    pub(super) fn new(config: &Config) -> Self {
        let auth = &config.auth;
        let rules = auth
            .rule
            .iter()
            .map(|r| {
                let mut identities: HashSet<String> =
                    r.identities.iter().filter(|i| *i != "*").cloned().collect();
                for g in &r.groups {
                    identities.extend(auth.groups.get(g).into_iter().flatten().cloned());
                }
                Rule {
                    identities,
                    any_identity: r.identities.iter().any(|i| i == "*"),
                    anonymous: r.anonymous,
                    pull: r.pull.iter().filter_map(|p| Glob::new(p).ok()).collect(),
                    admin: r.admin,
                }
            })
            .collect();
        Self {
            enabled: config.auth_enabled(),
            rules,
        }
    }

    /// Whether `who` may pull `repo` (as the upstream knows it: `library/alpine`) through
    /// the upstream named `upstream`. The upstream's configured name is used however the
    /// request chose it (`?ns=`, a path prefix, or the default), so one repository is
    /// judged the same by every route to it.
    pub(super) fn may_pull(&self, who: Subject<'_>, upstream: &str, repo: &str) -> bool {
        if !self.enabled {
            return true;
        }
        let name = format!("{upstream}/{repo}");
        self.rules
            .iter()
            .filter(|r| r.applies_to(who))
            .any(|r| r.pull.iter().any(|g| g.matches(&name)))
    }

    pub(super) fn is_admin(&self, who: Subject<'_>) -> bool {
        self.rules.iter().any(|r| r.admin && r.applies_to(who))
    }

    /// Whether any rule gives the admin API to an identity.
    pub(super) fn any_admin(&self) -> bool {
        self.rules.iter().any(|r| r.admin)
    }

    /// Whether an anonymous client may pull some repository of `upstream`.
    pub(super) fn anonymous_may_pull_from(&self, upstream: &str) -> bool {
        if !self.enabled {
            return true;
        }
        self.rules
            .iter()
            .filter(|r| r.anonymous)
            .any(|r| r.pull.iter().any(|g| g.may_match_under(upstream)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(toml: &str) -> Rules {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), toml).unwrap();
        Rules::new(&crate::config::load(Some(f.path()), Vec::new()).unwrap())
    }

    const RULES: &str = r#"
        [auth]
        htpasswd_file = "/etc/htpasswd"
        [auth.groups]
        ci = ["runner-1", "runner-2"]
        [[auth.rule]]
        groups = ["ci"]
        pull = ["docker.io/library/*", "ghcr/acme/**"]
        [[auth.rule]]
        identities = ["alice"]
        pull = ["**"]
        admin = true
        [[auth.rule]]
        identities = ["*"]
        pull = ["ghcr/public/*"]
        [[auth.rule]]
        anonymous = true
        pull = ["docker.io/library/alpine"]
    "#;

    #[test]
    fn identities_groups_and_anonymous_get_what_their_rules_say() {
        let r = rules(RULES);
        let runner = Subject::Identity("runner-2");
        assert!(r.may_pull(runner, "docker.io", "library/nginx"));
        assert!(
            !r.may_pull(runner, "docker.io", "library/nginx/extra"),
            "* stays in a segment"
        );
        assert!(r.may_pull(runner, "ghcr", "acme/team/app"));
        assert!(!r.may_pull(runner, "ghcr", "other/app"));
        assert!(
            r.may_pull(runner, "ghcr", "public/app"),
            "\"*\" is every identity"
        );
        assert!(!r.is_admin(runner));
        let alice = Subject::Identity("alice");
        assert!(r.may_pull(alice, "quay", "x/y") && r.is_admin(alice));
        let bob = Subject::Identity("bob");
        assert!(!r.may_pull(bob, "docker.io", "library/nginx"));
        assert!(r.may_pull(bob, "ghcr", "public/app"));
        assert!(r.may_pull(Subject::Anonymous, "docker.io", "library/alpine"));
        assert!(!r.may_pull(Subject::Anonymous, "docker.io", "library/nginx"));
        assert!(
            !r.may_pull(Subject::Anonymous, "ghcr", "public/app"),
            "\"*\" is not anonymous"
        );
        assert!(!r.is_admin(Subject::Anonymous));
        assert!(r.anonymous_may_pull_from("docker.io"));
        assert!(!r.anonymous_may_pull_from("ghcr"));
    }

    #[test]
    fn with_identity_sources_nothing_is_anonymous_by_default() {
        let r = rules("[auth]\nhtpasswd_file = \"/etc/htpasswd\"\n");
        assert!(!r.may_pull(Subject::Anonymous, "docker.io", "library/alpine"));
        assert!(!r.may_pull(Subject::Identity("alice"), "docker.io", "library/alpine"));
        assert!(!r.anonymous_may_pull_from("docker.io"));
    }

    #[test]
    fn without_auth_everything_is_open() {
        let r = rules("");
        assert!(r.may_pull(Subject::Anonymous, "docker.io", "library/alpine"));
        assert!(r.anonymous_may_pull_from("docker.io"));
        assert!(!r.any_admin());
    }
}
