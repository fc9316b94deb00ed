//! One upstream registry: HTTP requests with token auth, and bounded reads of the small
//! JSON answers (manifests, tag lists, referrers).

use super::auth::{parse_challenge, Challenge, TokenCache, TokenResponse};
use super::error::UpstreamError;
use crate::config::{ProxyConfig, Secret, UpstreamConfig};
use crate::oci::{Digest, RepoName, MANIFEST_ACCEPT, MANIFEST_MAX_BYTES};
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use reqwest::header::{HeaderMap, ACCEPT, CONTENT_TYPE, LINK, RETRY_AFTER, WWW_AUTHENTICATE};
use reqwest::{Method, Response, StatusCode};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use url::Url;

/// Error bodies are read only this far: enough for the OCI error JSON.
const ERROR_BODY_MAX_BYTES: usize = 64 * 1024;
/// Tag list pages followed at most; at 1000 tags a page that is 100 000 tags.
const TAG_PAGES_MAX: usize = 100;
const TAG_PAGE_SIZE: usize = 1000;
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
    /// Requests, answers, latency and bytes, for `/metrics` and the status page.
    pub stats: super::stats::UpstreamStats,
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
            docker_hub: is_docker_hub_host(&host_name),
            host,
            base,
            default: config.default,
            credentials,
            http,
            tokens: Mutex::new(TokenCache::default()),
            basic: AtomicBool::new(false),
            stats: super::stats::UpstreamStats::default(),
        })
    }

    fn url(&self, path: &str) -> Result<Url, UpstreamError> {
        self.base.join(path).map_err(|e| UpstreamError::Invalid {
            upstream: self.name.clone(),
            message: format!("bad path {path:?}: {e}"),
        })
    }

    /// Sends a request, answering one auth challenge if the upstream sends one.
    async fn send(
        &self,
        method: Method,
        url: Url,
        repo: &RepoName,
        accept: Option<&str>,
    ) -> Result<Response, UpstreamError> {
        let scope = format!("repository:{repo}:pull");
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
            let resp = self
                .stats
                .timed(super::stats::Op::of(&method, &url), req.send())
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
        let mut req = self.http.get(url);
        if let Some((user, pass)) = &self.credentials {
            req = req.basic_auth(user, Some(pass.expose()));
        }
        let resp = self
            .stats
            .timed(super::stats::Op::Token, req.send())
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

    async fn checked(&self, resp: Response) -> Result<Response, UpstreamError> {
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
        self.stats.fetched(body.len() as u64);
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

    /// The complete tag list, following `Link` pages (bounded).
    pub async fn tags(&self, repo: &RepoName) -> Result<Vec<String>, UpstreamError> {
        #[derive(serde::Deserialize)]
        struct TagList {
            tags: Option<Vec<String>>,
        }
        let mut url = self.url(&format!("/v2/{repo}/tags/list?n={TAG_PAGE_SIZE}"))?;
        let mut names = Vec::new();
        for page in 0..TAG_PAGES_MAX {
            if page + 1 == TAG_PAGES_MAX {
                tracing::warn!(
                    upstream = %self.name, repo.name = %repo, pages_max = TAG_PAGES_MAX,
                    "tag list has more pages than regcache follows; listing the first ones"
                );
            }
            let resp = self
                .checked(self.send(Method::GET, url.clone(), repo, None).await?)
                .await?;
            let next = header_string(resp.headers(), LINK).and_then(|l| next_link(&l));
            let body = read_limited(resp, MANIFEST_MAX_BYTES, &self.name).await?;
            self.stats.fetched(body.len() as u64);
            let page: TagList = serde_json::from_slice(&body).map_err(|e| UpstreamError::Invalid {
                upstream: self.name.clone(),
                message: format!("tag list: {e}"),
            })?;
            names.extend(page.tags.unwrap_or_default());
            match next {
                Some(next) => {
                    url = url.join(&next).map_err(|e| UpstreamError::Invalid {
                        upstream: self.name.clone(),
                        message: format!("tag list Link {next:?}: {e}"),
                    })?
                }
                None => break,
            }
        }
        Ok(names)
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
        self.stats.fetched(body.len() as u64);
        Ok(FetchedReferrers {
            body,
            content_type,
            filters_applied,
        })
    }
}

fn header_string(headers: &HeaderMap, name: impl reqwest::header::AsHeaderName) -> Option<String> {
    headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
}

/// The target of a `Link: <url>; rel="next"` header.
fn next_link(header: &str) -> Option<String> {
    header.split(',').find_map(|part| {
        let (target, params) = part.split_once(';')?;
        let is_next = params
            .split(';')
            .any(|p| p.trim().replace(' ', "") == "rel=\"next\"" || p.trim() == "rel=next");
        let target = target.trim().strip_prefix('<')?.strip_suffix('>')?;
        is_next.then(|| target.to_owned())
    })
}

/// Reads a body, failing once it passes `limit` bytes (without trusting Content-Length).
async fn read_limited(resp: Response, limit: usize, upstream: &str) -> Result<Bytes, UpstreamError> {
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
    fn link_header_next_target() {
        assert_eq!(
            next_link(r#"</v2/a/tags/list?n=2&last=b>; rel="next""#).as_deref(),
            Some("/v2/a/tags/list?n=2&last=b")
        );
        assert_eq!(next_link(r#"<http://x/y>; rel="prev""#), None);
        assert_eq!(next_link("garbage"), None);
    }

    #[test]
    fn docker_hub_hosts_are_recognised() {
        assert!(is_docker_hub_host("registry-1.docker.io"));
        assert!(!is_docker_hub_host("ghcr.io"));
    }
}
