//! Choosing the upstream for a request: containerd's `?ns=<host>`, else a path prefix
//! `/v2/<upstream-name>/<repo>`, else the default upstream. Docker Hub names get
//! `library/` when they have one component.

use super::client::Upstream;
use super::error::UpstreamError;
use crate::config::Config;
use crate::oci::RepoName;
use std::sync::Arc;

/// Every configured upstream.
#[derive(Debug, Clone)]
pub struct Upstreams {
    list: Vec<Arc<Upstream>>,
}

/// The upstream that serves a request and the repository name as that upstream knows it.
#[derive(Debug, Clone)]
pub struct Routed {
    pub upstream: Arc<Upstream>,
    pub repo: RepoName,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum RouteError {
    #[error("no upstream is configured for namespace {0:?}")]
    UnknownNamespace(String),
    #[error("no default upstream is configured; prefix the repository with an upstream name ({0})")]
    NoDefault(String),
}

impl Upstreams {
    pub fn from_config(config: &Config) -> Result<Self, UpstreamError> {
        let list = config
            .upstream
            .iter()
            .map(|u| Upstream::new(u, &config.proxy).map(Arc::new))
            .collect::<Result<_, _>>()?;
        Ok(Self { list })
    }

    pub fn by_name(&self, name: &str) -> Option<&Arc<Upstream>> {
        self.list.iter().find(|u| u.name == name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Upstream>> {
        self.list.iter()
    }

    pub fn route(&self, ns: Option<&str>, name: &RepoName) -> Result<Routed, RouteError> {
        let (upstream, repo) = if let Some(ns) = ns.filter(|n| !n.is_empty()) {
            let ns = ns.to_ascii_lowercase();
            let u = self
                .list
                .iter()
                .find(|u| u.name == ns || u.host == ns || (u.docker_hub && is_docker_hub_namespace(&ns)))
                .ok_or(RouteError::UnknownNamespace(ns))?;
            (u.clone(), name.clone())
        } else if let Some((u, rest)) = self.by_prefix(name) {
            (u.clone(), rest)
        } else {
            let names: Vec<&str> = self.list.iter().map(|u| u.name.as_str()).collect();
            let u = self
                .list
                .iter()
                .find(|u| u.default)
                .ok_or_else(|| RouteError::NoDefault(names.join(", ")))?;
            (u.clone(), name.clone())
        };
        let repo = if upstream.docker_hub {
            repo.with_library_prefix()
        } else {
            repo
        };
        Ok(Routed { upstream, repo })
    }

    fn by_prefix(&self, name: &RepoName) -> Option<(&Arc<Upstream>, RepoName)> {
        let (first, rest) = name.as_str().split_once('/')?;
        let u = self.by_name(first)?;
        Some((u, rest.parse().ok()?))
    }
}

fn is_docker_hub_namespace(ns: &str) -> bool {
    matches!(
        ns,
        "docker.io" | "registry-1.docker.io" | "index.docker.io" | "registry.hub.docker.com"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstreams(toml: &str) -> Upstreams {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), toml).unwrap();
        let config = crate::config::load(Some(f.path()), Vec::new()).unwrap();
        Upstreams::from_config(&config).unwrap()
    }

    fn route(u: &Upstreams, ns: Option<&str>, name: &str) -> Result<(String, String), RouteError> {
        u.route(ns, &name.parse().unwrap())
            .map(|r| (r.upstream.name.clone(), r.repo.to_string()))
    }

    const TWO: &str = r#"
        [[upstream]]
        name = "hub"
        url = "https://registry-1.docker.io"
        default = true
        [[upstream]]
        name = "ghcr"
        url = "https://ghcr.io"
        [[upstream]]
        name = "local"
        url = "http://127.0.0.1:15000"
    "#;

    #[test]
    fn ns_selects_by_name_host_or_docker_io() {
        let u = upstreams(TWO);
        assert_eq!(
            route(&u, Some("docker.io"), "alpine"),
            Ok(("hub".into(), "library/alpine".into()))
        );
        assert_eq!(
            route(&u, Some("ghcr.io"), "org/app"),
            Ok(("ghcr".into(), "org/app".into()))
        );
        assert_eq!(
            route(&u, Some("127.0.0.1:15000"), "a/b"),
            Ok(("local".into(), "a/b".into()))
        );
        assert_eq!(
            route(&u, Some("ghcr"), "org/app"),
            Ok(("ghcr".into(), "org/app".into()))
        );
        assert_eq!(
            route(&u, Some("quay.io"), "x"),
            Err(RouteError::UnknownNamespace("quay.io".into()))
        );
    }

    #[test]
    fn prefix_then_default_with_library_normalisation() {
        let u = upstreams(TWO);
        assert_eq!(
            route(&u, None, "ghcr/org/app"),
            Ok(("ghcr".into(), "org/app".into()))
        );
        assert_eq!(
            route(&u, None, "hub/alpine"),
            Ok(("hub".into(), "library/alpine".into()))
        );
        assert_eq!(
            route(&u, None, "alpine"),
            Ok(("hub".into(), "library/alpine".into()))
        );
        assert_eq!(route(&u, None, "org/app"), Ok(("hub".into(), "org/app".into())));
        // A name equal to an upstream name alone is a repository, not a prefix.
        assert_eq!(route(&u, None, "ghcr"), Ok(("hub".into(), "library/ghcr".into())));
    }

    #[test]
    fn without_default_unprefixed_names_fail() {
        let u = upstreams("[[upstream]]\nname = \"a\"\nurl = \"http://a\"\n[[upstream]]\nname = \"b\"\nurl = \"http://b\"\n");
        assert!(matches!(route(&u, None, "x/y"), Err(RouteError::NoDefault(_))));
        assert_eq!(route(&u, None, "b/x/y"), Ok(("b".into(), "x/y".into())));
        // Non-Docker-Hub upstreams never get library/.
        assert_eq!(route(&u, None, "a/x"), Ok(("a".into(), "x".into())));
    }
}
