//! One upstream registry: HTTP requests with token auth, and bounded reads of the small
//! JSON answers (manifests, tag lists, referrers).

use super::auth::{parse_challenge, Challenge, TokenCache, TokenResponse};
use super::error::UpstreamError;
use crate::config::{ProxyConfig, Secret, UpstreamConfig};
use crate::oci::{Digest, RepoName, MANIFEST_ACCEPT, MANIFEST_MAX_BYTES};
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use reqwest::header::{HeaderMap, ACCEPT, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use reqwest::{Method, Response, StatusCode};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use url::Url;

/// Error bodies are read only this far: enough for the OCI error JSON.
const ERROR_BODY_MAX_BYTES: usize = 64 * 1024;
const USER_AGENT: &str = concat!("regcache/", env!("CARGO_PKG_VERSION"));

/// A manifest as the upstream sent it (not yet verified).
#[derive(Debug, Clone)]
pub struct FetchedManifest {
    pub body: Bytes,
    pub content_type: Option<String>,
    pub digest_header: Option<String>,
}

/// What a manifest HEAD told.
#[derive(Debug, Clone)]
pub struct ManifestHead {
    pub digest: Option<String>,
}

/// A referrers answer.
#[derive(Debug, Clone)]
pub struct FetchedReferrers {
    pub body: Bytes,
    pub content_type: String,
    pub filters_applied: Option<String>,
}

/// A configured upstream registry.
#[derive(Debug)]
pub struct Upstream {
    pub name: String,
    base: Url,
    /// `host[:port]` of the base URL, matched against containerd's `ns`.
    pub host: String,
    /// Docker Hub: single-component names get `library/`, and `ns=docker.io` matches.
    pub docker_hub: bool,
    pub default: bool,
    credentials: Option<(String, Secret)>,
    http: reqwest::Client,
    tokens: Mutex<TokenCache>,
    /// The upstream asked for Basic auth once: send it up front from then on.
    basic: AtomicBool,
    /// Sent as `?ns=` on every request: this upstream is a mirror of that registry (a
    /// chained regcache).
    ns: Option<String>,
}

fn is_docker_hub_host(host: &str) -> bool {
    matches!(
        host,
        "registry-1.docker.io" | "docker.io" | "index.docker.io" | "registry.hub.docker.com"
    )
}

impl Upstream {
    pub fn new(config: &UpstreamConfig, proxy: &ProxyConfig) -> Result<Self, UpstreamError> {
        let invalid = |message: String| UpstreamError::Invalid {
            upstream: config.name.clone(),
            message,
        };
        let base = Url::parse(&config.url).map_err(|e| invalid(format!("url {:?}: {e}", config.url)))?;
        let host_name = base.host_str().unwrap_or_default().to_owned();
        let host = match base.port() {
            Some(p) => format!("{host_name}:{p}"),
            None => host_name.clone(),
        };
        let http = reqwest::Client::builder()
            .user_agent(USER_AGENT)
            .connect_timeout(proxy.connect_timeout.to_std())
            .read_timeout(proxy.read_timeout.to_std())
            .pool_max_idle_per_host(32)
            .build()
            .map_err(|e| invalid(format!("HTTP client: {e}")))?;
        let credentials = match (&config.username, &config.password) {
            (Some(u), Some(p)) => Some((u.clone(), p.clone())),
            (Some(u), None) => Some((u.clone(), Secret::default())),
            _ => None,
        };
        Ok(Self {
            name: config.name.clone(),
            // A mirror asked for Docker Hub names Docker Hub's way (`library/alpine`).
            docker_hub: is_docker_hub_host(&host_name)
                || config.ns.as_deref().is_some_and(is_docker_hub_host),
            host,
            base,
            default: config.default,
            credentials,
            http,
            tokens: Mutex::new(TokenCache::default()),
            basic: AtomicBool::new(false),
            ns: config.ns.clone(),
        })
    }

    /// `url` with this upstream's `ns` added, unless it has one (a `Link` of a chained
    /// regcache does not carry it, so every page gets it here).
    fn with_ns(&self, mut url: Url) -> Url {
        if let Some(ns) = &self.ns {
            if !url.query_pairs().any(|(k, _)| k == "ns") {
                url.query_pairs_mut().append_pair("ns", ns);
            }
        }
        url
    }

    /// `path` (`/v2/…`) on this upstream, after the configured URL's own path: an upstream
    /// `https://host/mirror` is asked at `https://host/mirror/v2/…`, as registries served
    /// under a path (Artifactory's `/artifactory/api/docker/<repo>`, Nexus's
    /// `/repository/<name>`) expect.
    pub(super) fn url(&self, path: &str) -> Result<Url, UpstreamError> {
        let full = format!("{}{path}", self.base.path().trim_end_matches('/'));
        self.base.join(&full).map_err(|e| UpstreamError::Invalid {
            upstream: self.name.clone(),
            message: format!("bad path {path:?}: {e}"),
        })
    }

    /// Whether `url` is on this upstream's own scheme, host and port: the only place its
    /// credentials and tokens may go (I9).
    pub(super) fn is_own_origin(&self, url: &Url) -> bool {
        url.origin() == self.base.origin()
    }

    /// Sends a request, answering one auth challenge if the upstream sends one. Only to
    /// the upstream's own origin, since it attaches the credentials.
    pub(super) async fn send(
        &self,
        method: Method,
        url: Url,
        repo: &RepoName,
        accept: Option<&str>,
    ) -> Result<Response, UpstreamError> {
        if !self.is_own_origin(&url) {
            // Callers build URLs from `base` and check tag-list pages; this guards any
            // future caller against sending the credentials elsewhere.
            return Err(UpstreamError::Invalid {
                upstream: self.name.clone(),
                message: format!(
                    "refused a request to {}, outside the upstream's origin",
                    url.origin().ascii_serialization()
                ),
            });
        }
        let scope = format!("repository:{repo}:pull");
        let url = self.with_ns(url);
        for attempt in 0..2 {
            let mut req = self.http.request(method.clone(), url.clone());
            if let Some(a) = accept {
                req = req.header(ACCEPT, a);
            }
            let token = self.tokens.lock().ok().and_then(|t| t.get(&scope));
            if let Some(token) = token {
                req = req.bearer_auth(token);
            } else if self.basic.load(Ordering::Relaxed) {
                if let Some((user, pass)) = &self.credentials {
                    req = req.basic_auth(user, Some(pass.expose()));
                }
            }
            let resp = req
                .send()
                .await
                .map_err(|e| UpstreamError::from_reqwest(&self.name, &e))?;
            if resp.status() != StatusCode::UNAUTHORIZED || attempt > 0 {
                return Ok(resp);
            }
            let challenge = resp
                .headers()
                .get(WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_challenge);
            match challenge {
                Some(Challenge::Bearer {
                    realm,
                    service,
                    scope: asked,
                }) => {
                    let token_scope = asked.unwrap_or_else(|| scope.clone());
                    let (token, lifetime) =
                        self.fetch_token(&realm, service.as_deref(), &token_scope).await?;
                    if let Ok(mut t) = self.tokens.lock() {
                        t.put(&scope, token, lifetime);
                    }
                }
                Some(Challenge::Basic)
                    if self.credentials.is_some() && !self.basic.load(Ordering::Relaxed) =>
                {
                    self.basic.store(true, Ordering::Relaxed);
                }
                _ => return Ok(resp),
            }
        }
        Err(UpstreamError::Auth {
            upstream: self.name.clone(),
            message: "authentication loop".into(),
        })
    }

    async fn fetch_token(
        &self,
        realm: &str,
        service: Option<&str>,
        scope: &str,
    ) -> Result<(String, std::time::Duration), UpstreamError> {
        let auth_err = |message: String| UpstreamError::Auth {
            upstream: self.name.clone(),
            message,
        };
        let mut url =
            Url::parse(realm).map_err(|e| auth_err(format!("token realm {realm:?} is not a URL: {e}")))?;
        {
            let mut q = url.query_pairs_mut();
            if let Some(s) = service {
                q.append_pair("service", s);
            }
            q.append_pair("scope", scope);
        }
        let mut req = self.http.get(url.clone());
        if let Some((user, pass)) = &self.credentials {
            if may_send_password(&self.base, &url) {
                req = req.basic_auth(user, Some(pass.expose()));
            } else {
                tracing::warn!(
                    upstream = %self.name, realm = %url.origin().ascii_serialization(),
                    "the token realm is plain http while the upstream is https; asking for a token without the credentials"
                );
            }
        }
        let resp = req
            .send()
            .await
            .map_err(|e| UpstreamError::from_reqwest(&self.name, &e))?;
        if !resp.status().is_success() {
            let status = resp.status();
            return Err(match status {
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                    auth_err(format!("token endpoint refused the credentials ({status})"))
                }
                _ => self.status_error(resp).await,
            });
        }
        let body = read_limited(resp, ERROR_BODY_MAX_BYTES, &self.name).await?;
        serde_json::from_slice::<TokenResponse>(&body)
            .ok()
            .and_then(TokenResponse::into_token)
            .ok_or_else(|| auth_err("token endpoint answered without a token".into()))
    }

    /// Turns a non-success response into an error carrying the OCI code, if any.
    async fn status_error(&self, resp: Response) -> UpstreamError {
        let status = resp.status().as_u16();
        let retry_after = header_string(resp.headers(), RETRY_AFTER);
        let body = read_limited(resp, ERROR_BODY_MAX_BYTES, &self.name)
            .await
            .unwrap_or_default();
        #[derive(serde::Deserialize)]
        struct Errors {
            errors: Vec<OciError>,
        }
        #[derive(serde::Deserialize)]
        struct OciError {
            code: String,
            #[serde(default)]
            message: String,
        }
        let parsed = serde_json::from_slice::<Errors>(&body)
            .ok()
            .and_then(|e| e.errors.into_iter().next());
        let (code, message) = match parsed {
            Some(e) => (Some(e.code), e.message),
            None => (
                None,
                String::from_utf8_lossy(&body[..body.len().min(200)])
                    .trim()
                    .to_owned(),
            ),
        };
        UpstreamError::Status {
            upstream: self.name.clone(),
            status,
            code,
            message,
            retry_after,
        }
    }

    pub(super) async fn checked(&self, resp: Response) -> Result<Response, UpstreamError> {
        if resp.status().is_success() {
            Ok(resp)
        } else {
            Err(self.status_error(resp).await)
        }
    }

    pub async fn get_manifest(
        &self,
        repo: &RepoName,
        reference: &str,
    ) -> Result<FetchedManifest, UpstreamError> {
        let url = self.url(&format!("/v2/{repo}/manifests/{reference}"))?;
        let resp = self
            .checked(self.send(Method::GET, url, repo, Some(MANIFEST_ACCEPT)).await?)
            .await?;
        if resp
            .content_length()
            .is_some_and(|l| l > MANIFEST_MAX_BYTES as u64)
        {
            return Err(self.too_large());
        }
        let content_type = header_string(resp.headers(), CONTENT_TYPE);
        let digest_header = header_string(resp.headers(), "docker-content-digest");
        let body = read_limited(resp, MANIFEST_MAX_BYTES, &self.name).await?;
        Ok(FetchedManifest {
            body,
            content_type,
            digest_header,
        })
    }

    fn too_large(&self) -> UpstreamError {
        UpstreamError::TooLarge {
            upstream: self.name.clone(),
            limit_bytes: MANIFEST_MAX_BYTES,
        }
    }

    pub async fn head_manifest(
        &self,
        repo: &RepoName,
        reference: &str,
    ) -> Result<ManifestHead, UpstreamError> {
        let url = self.url(&format!("/v2/{repo}/manifests/{reference}"))?;
        let resp = self
            .checked(self.send(Method::HEAD, url, repo, Some(MANIFEST_ACCEPT)).await?)
            .await?;
        Ok(ManifestHead {
            digest: header_string(resp.headers(), "docker-content-digest"),
        })
    }

    /// Starts a blob download; the caller streams and verifies the body.
    pub async fn get_blob(&self, repo: &RepoName, digest: &Digest) -> Result<Response, UpstreamError> {
        let url = self.url(&format!("/v2/{repo}/blobs/{digest}"))?;
        self.checked(self.send(Method::GET, url, repo, None).await?).await
    }

    /// Asks whether the upstream serves `digest` under `repo`, and its size.
    pub async fn head_blob(&self, repo: &RepoName, digest: &Digest) -> Result<Option<u64>, UpstreamError> {
        let url = self.url(&format!("/v2/{repo}/blobs/{digest}"))?;
        let resp = self
            .checked(self.send(Method::HEAD, url, repo, None).await?)
            .await?;
        Ok(resp.content_length().filter(|l| *l > 0).or_else(|| {
            header_string(resp.headers(), reqwest::header::CONTENT_LENGTH).and_then(|v| v.parse().ok())
        }))
    }

    pub async fn referrers(
        &self,
        repo: &RepoName,
        digest: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<FetchedReferrers, UpstreamError> {
        let mut url = self.url(&format!("/v2/{repo}/referrers/{digest}"))?;
        if let Some(t) = artifact_type {
            url.query_pairs_mut().append_pair("artifactType", t);
        }
        let resp = self
            .checked(
                self.send(
                    Method::GET,
                    url,
                    repo,
                    Some("application/vnd.oci.image.index.v1+json"),
                )
                .await?,
            )
            .await?;
        let content_type = header_string(resp.headers(), CONTENT_TYPE)
            .unwrap_or_else(|| "application/vnd.oci.image.index.v1+json".into());
        let filters_applied = header_string(resp.headers(), "oci-filters-applied");
        let body = read_limited(resp, MANIFEST_MAX_BYTES, &self.name).await?;
        Ok(FetchedReferrers {
            body,
            content_type,
            filters_applied,
        })
    }
}

pub(super) fn header_string(headers: &HeaderMap, name: impl reqwest::header::AsHeaderName) -> Option<String> {
    headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
}

/// Whether the upstream's password may go to the token realm `realm`: not over plain
/// http when the upstream itself is https (a realm the upstream names must not downgrade
/// the credentials to clear text).
fn may_send_password(base: &Url, realm: &Url) -> bool {
    realm.scheme() == "https" || base.scheme() == "http"
}

/// Reads a body, failing once it passes `limit` bytes (without trusting Content-Length).
pub(super) async fn read_limited(
    resp: Response,
    limit: usize,
    upstream: &str,
) -> Result<Bytes, UpstreamError> {
    let mut out = BytesMut::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| UpstreamError::from_reqwest(upstream, &e))?;
        if out.len() + chunk.len() > limit {
            return Err(UpstreamError::TooLarge {
                upstream: upstream.to_owned(),
                limit_bytes: limit,
            });
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_password_goes_over_http_only_for_an_http_upstream() {
        let url = |s: &str| Url::parse(s).unwrap();
        let https = url("https://registry.example");
        let http = url("http://registry.internal:5000");
        assert!(may_send_password(&https, &url("https://auth.example/token")));
        assert!(!may_send_password(&https, &url("http://auth.example/token")));
        assert!(!may_send_password(&https, &url("http://registry.example/token")));
        assert!(may_send_password(&http, &url("http://auth.internal/token")));
        assert!(may_send_password(&http, &url("https://auth.example/token")));
    }

    fn config(url: &str) -> UpstreamConfig {
        UpstreamConfig {
            name: "m".into(),
            url: url.into(),
            default: true,
            username: Some("user".into()),
            password: Some(Secret::new("pass")),
            password_file: None,
            ttl: None,
            ns: None,
        }
    }

    /// Answers one request on 127.0.0.1 with a token; yields the `Authorization` it got.
    async fn token_realm() -> (String, tokio::task::JoinHandle<Option<String>>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let realm = format!("http://{}/token", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                let mut byte = [0u8; 1];
                conn.read_exact(&mut byte).await.unwrap();
                head.push(byte[0]);
            }
            let body = r#"{"token":"t","expires_in":300}"#;
            let answer = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}", body.len());
            conn.write_all(answer.as_bytes()).await.unwrap();
            String::from_utf8(head).unwrap().lines().find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("authorization")
                    .then(|| value.trim().to_owned())
            })
        });
        (realm, task)
    }

    #[tokio::test]
    async fn an_https_upstream_never_sends_its_password_to_an_http_realm() {
        let proxy = crate::config::load(None, Vec::new()).unwrap().proxy;
        for (base, sent) in [
            ("https://registry.invalid", None),
            ("http://registry.invalid", Some("Basic dXNlcjpwYXNz")),
        ] {
            let upstream = Upstream::new(&config(base), &proxy).unwrap();
            let (realm, got) = token_realm().await;
            let (token, _) = upstream
                .fetch_token(&realm, None, "repository:a:pull")
                .await
                .unwrap();
            assert_eq!(token, "t");
            assert_eq!(got.await.unwrap().as_deref(), sent, "{base}");
        }
    }

    #[test]
    fn requests_go_under_the_configured_path() {
        let proxy = crate::config::load(None, Vec::new()).unwrap().proxy;
        for (base, want) in [
            ("https://host", "https://host/v2/a/b/tags/list?n=1"),
            ("https://host/", "https://host/v2/a/b/tags/list?n=1"),
            ("https://host/mirror", "https://host/mirror/v2/a/b/tags/list?n=1"),
            (
                "https://host:8443/x/y/",
                "https://host:8443/x/y/v2/a/b/tags/list?n=1",
            ),
        ] {
            let u = Upstream::new(&config(base), &proxy).unwrap();
            assert_eq!(u.url("/v2/a/b/tags/list?n=1").unwrap().as_str(), want, "{base}");
            assert!(u.is_own_origin(&u.url("/v2/").unwrap()));
        }
        let u = Upstream::new(&config("https://host"), &proxy).unwrap();
        for other in ["http://host/v2/", "https://host:444/v2/", "https://other/v2/"] {
            assert!(!u.is_own_origin(&Url::parse(other).unwrap()), "{other}");
        }
    }

    fn upstream(ns: Option<&str>) -> Upstream {
        let config = UpstreamConfig {
            name: "regional".into(),
            url: "http://regional.local:5000".into(),
            default: true,
            username: None,
            password: None,
            password_file: None,
            ttl: None,
            ns: ns.map(str::to_owned),
        };
        Upstream::new(&config, &ProxyConfig::default()).unwrap()
    }

    #[test]
    fn ns_is_added_once_to_every_url_and_docker_io_gives_hub_naming() {
        let u = upstream(Some("docker.io"));
        assert!(
            u.docker_hub,
            "ns = docker.io names repositories as Docker Hub does"
        );
        let page = u.url("/v2/library/alpine/tags/list?n=1000").unwrap();
        assert_eq!(
            u.with_ns(page).as_str(),
            "http://regional.local:5000/v2/library/alpine/tags/list?n=1000&ns=docker.io"
        );
        let blob = u.with_ns(u.url("/v2/a/blobs/sha256:x").unwrap());
        assert_eq!(blob.query(), Some("ns=docker.io"));
        assert_eq!(u.with_ns(blob.clone()), blob, "never twice");
        let plain = upstream(None);
        assert!(!plain.docker_hub);
        let url = plain.url("/v2/a/manifests/v1").unwrap();
        assert_eq!(plain.with_ns(url.clone()), url);
        assert!(!upstream(Some("ghcr.io")).docker_hub);
    }

    #[test]
    fn docker_hub_hosts_are_recognised() {
        assert!(is_docker_hub_host("registry-1.docker.io"));
        assert!(!is_docker_hub_host("ghcr.io"));
    }
}
