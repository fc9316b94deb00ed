//! The registry token dance: parse a `WWW-Authenticate` challenge, fetch a bearer token
//! from its realm (with Basic credentials when configured), cache it until it expires.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// A parsed `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Challenge {
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
    Basic,
}

/// Parses the first challenge we can answer from a `WWW-Authenticate` value.
pub(super) fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
    match scheme.to_ascii_lowercase().as_str() {
        "basic" => Some(Challenge::Basic),
        "bearer" => {
            let params = parse_params(rest);
            Some(Challenge::Bearer {
                realm: params.get("realm")?.clone(),
                service: params.get("service").cloned(),
                scope: params.get("scope").cloned(),
            })
        }
        _ => None,
    }
}

/// `key="quoted, value",key2=token` → map (keys lowercased).
fn parse_params(s: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            break;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => {
                        if let Some(n) = chars.next() {
                            value.push(n);
                        }
                    }
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.peek() {
                if *c == ',' {
                    break;
                }
                value.push(*c);
                chars.next();
            }
        }
        out.insert(key.trim().to_ascii_lowercase(), value.trim().to_owned());
    }
    out
}

/// Tokens without `expires_in` live 60 s (the distribution token spec's default).
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);
/// A token is kept at most this long, whatever `expires_in` says: an absurd value must not
/// overflow the expiry instant (a panic), and re-fetching once an hour costs one request
/// per repository (a token refused earlier is renewed on its 401 anyway).
const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);
/// Renew a little early so a token does not expire between check and use.
const EXPIRY_MARGIN: Duration = Duration::from_secs(10);
/// Cached tokens per upstream; scopes are per repository, so bound the map.
const TOKENS_MAX: usize = 4096;

#[derive(Debug, serde::Deserialize)]
pub(super) struct TokenResponse {
    token: Option<String>,
    access_token: Option<String>,
    /// Seconds; anything but a non-negative number counts as absent rather than making
    /// the whole answer unreadable.
    expires_in: Option<serde_json::Value>,
}

impl TokenResponse {
    pub(super) fn into_token(self) -> Option<(String, Duration)> {
        let token = self.token.or(self.access_token).filter(|t| !t.is_empty())?;
        let secs = self.expires_in.and_then(|v| v.as_f64()).filter(|s| *s >= 0.0);
        // `as` saturates: 1e300 becomes u64::MAX, then the clamp.
        let lifetime = secs.map_or(DEFAULT_TOKEN_LIFETIME, |s| Duration::from_secs(s as u64));
        Some((token, lifetime.min(MAX_TOKEN_LIFETIME)))
    }
}

/// Bearer tokens by scope.
#[derive(Debug, Default)]
pub(super) struct TokenCache {
    tokens: HashMap<String, (String, Instant)>,
}

impl TokenCache {
    pub(super) fn get(&self, scope: &str) -> Option<String> {
        let (token, expires) = self.tokens.get(scope)?;
        (Instant::now() < *expires).then(|| token.clone())
    }

    pub(super) fn put(&mut self, scope: &str, token: String, lifetime: Duration) {
        if self.tokens.len() >= TOKENS_MAX {
            let now = Instant::now();
            self.tokens.retain(|_, (_, exp)| *exp > now);
            if self.tokens.len() >= TOKENS_MAX {
                self.tokens.clear();
            }
        }
        let lifetime = lifetime
            .min(MAX_TOKEN_LIFETIME)
            .saturating_sub(EXPIRY_MARGIN)
            .max(Duration::from_secs(1));
        let now = Instant::now();
        let expires = now.checked_add(lifetime).unwrap_or(now);
        self.tokens.insert(scope.to_owned(), (token, expires));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_docker_hub_challenge() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#,
        );
        assert_eq!(
            c,
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/alpine:pull".into()),
            })
        );
    }

    #[test]
    fn parses_quoted_commas_and_basic() {
        let c = parse_challenge(r#"bearer realm="http://x/token", scope="repository:a:pull,push""#);
        assert!(matches!(c, Some(Challenge::Bearer { scope: Some(s), .. }) if s == "repository:a:pull,push"));
        assert_eq!(
            parse_challenge(r#"Basic realm="registry""#),
            Some(Challenge::Basic)
        );
        assert_eq!(parse_challenge("Bearer service=x"), None);
        assert_eq!(parse_challenge("Negotiate"), None);
    }

    #[test]
    fn token_cache_expires() {
        let mut cache = TokenCache::default();
        cache.put("s", "t".into(), Duration::from_secs(300));
        assert_eq!(cache.get("s").as_deref(), Some("t"));
        assert_eq!(cache.get("other"), None);
        let r: TokenResponse = serde_json::from_str(r#"{"access_token":"a"}"#).unwrap();
        assert_eq!(r.into_token(), Some(("a".into(), DEFAULT_TOKEN_LIFETIME)));
        let r: TokenResponse = serde_json::from_str(r#"{"token":""}"#).unwrap();
        assert_eq!(r.into_token(), None);
    }

    #[test]
    fn absurd_token_lifetimes_are_clamped_and_never_panic() {
        for (json, lifetime) in [
            (
                r#"{"token":"t","expires_in":18446744073709551615}"#,
                MAX_TOKEN_LIFETIME,
            ),
            (r#"{"token":"t","expires_in":1e300}"#, MAX_TOKEN_LIFETIME),
            (r#"{"token":"t","expires_in":300}"#, Duration::from_secs(300)),
            (r#"{"token":"t","expires_in":-5}"#, DEFAULT_TOKEN_LIFETIME),
            (r#"{"token":"t","expires_in":"soon"}"#, DEFAULT_TOKEN_LIFETIME),
        ] {
            let r: TokenResponse = serde_json::from_str(json).unwrap();
            assert_eq!(r.into_token(), Some(("t".into(), lifetime)), "{json}");
        }
        // Even a lifetime that did not pass through `into_token`.
        let mut cache = TokenCache::default();
        cache.put("s", "t".into(), Duration::MAX);
        assert_eq!(cache.get("s").as_deref(), Some("t"));
    }
}
