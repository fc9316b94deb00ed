//! What a client presented in its `Authorization` header: nothing, Basic credentials, or
//! a bearer token; and the keyed hash that stands for them in memory, so the verified
//! cache and the token table never hold a password or token itself. Pure.

use base64::Engine as _;
use sha2::{Digest as _, Sha256};

/// Longest `Authorization` value looked at; longer ones are refused unread. A bcrypt
/// password is at most 72 bytes and our tokens are short, so 4 KiB is generous.
const HEADER_MAX_BYTES: usize = 4096;

/// The credentials of one request.
#[derive(Clone, PartialEq, Eq)]
pub(super) enum Presented {
    /// No `Authorization` header, or Basic with an empty user and password (what
    /// containers/image — skopeo, Podman — sends when it has no login for a registry
    /// that answered a Basic challenge).
    Nothing,
    Basic {
        user: String,
        password: String,
    },
    Bearer(String),
    /// A header that is neither: counted as a failed login.
    Malformed,
}

// Never print what a client presented (I9): only its kind and the user name.
impl std::fmt::Debug for Presented {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Nothing => f.write_str("Nothing"),
            Self::Basic { user, .. } => write!(f, "Basic({user:?}, <redacted>)"),
            Self::Bearer(_) => f.write_str("Bearer(<redacted>)"),
            Self::Malformed => f.write_str("Malformed"),
        }
    }
}

impl Presented {
    pub(super) fn from_header(value: Option<&axum::http::HeaderValue>) -> Self {
        let Some(value) = value else {
            return Self::Nothing;
        };
        if value.len() > HEADER_MAX_BYTES {
            return Self::Malformed;
        }
        let Ok(text) = value.to_str() else {
            return Self::Malformed;
        };
        let (scheme, rest) = text.trim().split_once(' ').unwrap_or((text, ""));
        let rest = rest.trim();
        if scheme.eq_ignore_ascii_case("basic") {
            let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(rest) else {
                return Self::Malformed;
            };
            let Ok(pair) = String::from_utf8(decoded) else {
                return Self::Malformed;
            };
            match pair.split_once(':') {
                Some(("", "")) => Self::Nothing,
                Some((user, password)) => Self::Basic {
                    user: user.to_owned(),
                    password: password.to_owned(),
                },
                None => Self::Malformed,
            }
        } else if scheme.eq_ignore_ascii_case("bearer") && !rest.is_empty() {
            Self::Bearer(rest.to_owned())
        } else {
            Self::Malformed
        }
    }
}

/// A keyed SHA-256: the key is random per process, so these hashes are useless outside
/// it (a memory dump does not give a fast offline check of a password).
#[derive(Clone)]
pub(super) struct Hasher {
    key: [u8; 32],
}

impl std::fmt::Debug for Hasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hasher(<key>)")
    }
}

/// The hash standing for one set of credentials.
pub(super) type Key = [u8; 32];

impl Hasher {
    pub(super) fn random() -> Self {
        // Two ULIDs: 160 random bits from a CSPRNG (ulid uses rand's thread_rng), hashed
        // into a key, without another dependency for randomness.
        let seed = format!("{}{}", ulid::Ulid::new(), ulid::Ulid::new());
        Self {
            key: Sha256::digest(seed.as_bytes()).into(),
        }
    }

    fn hash(&self, kind: &[u8], parts: &[&[u8]]) -> Key {
        let mut h = Sha256::new();
        h.update(self.key);
        h.update(kind);
        for p in parts {
            // Length-prefixed, so ("ab", "c") and ("a", "bc") differ.
            h.update((p.len() as u64).to_be_bytes());
            h.update(p);
        }
        h.finalize().into()
    }

    pub(super) fn basic(&self, user: &str, password: &str) -> Key {
        self.hash(b"basic", &[user.as_bytes(), password.as_bytes()])
    }

    pub(super) fn token(&self, token: &str) -> Key {
        self.hash(b"token", &[token.as_bytes()])
    }
}

/// Equality whose time depends only on the lengths, not on where the bytes differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0xff);
        diff |= x ^ y;
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn parse(v: &str) -> Presented {
        Presented::from_header(Some(&HeaderValue::from_str(v).unwrap()))
    }

    fn basic(pair: &str) -> String {
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(pair))
    }

    #[test]
    fn basic_bearer_nothing_and_malformed() {
        assert_eq!(Presented::from_header(None), Presented::Nothing);
        assert_eq!(
            parse(&basic("alice:pa:ss")),
            Presented::Basic {
                user: "alice".into(),
                password: "pa:ss".into()
            }
        );
        assert_eq!(
            parse(&basic(":")),
            Presented::Nothing,
            "containers/image without a login"
        );
        assert_eq!(parse("bearer  tok-123 "), Presented::Bearer("tok-123".into()));
        for bad in [
            "Basic !!!",
            "Basic",
            &basic("no-colon"),
            "Digest x",
            "Bearer ",
            "Token abc",
        ] {
            assert_eq!(parse(bad), Presented::Malformed, "{bad}");
        }
        let long = format!("Bearer {}", "a".repeat(HEADER_MAX_BYTES));
        assert_eq!(parse(&long), Presented::Malformed);
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let text = format!(
            "{:?} {:?}",
            parse(&basic("alice:hunter2")),
            parse("Bearer s3cr3t-token")
        );
        assert!(!text.contains("hunter2") && !text.contains("s3cr3t"), "{text}");
        assert!(text.contains("alice"));
    }

    #[test]
    fn keys_separate_fields_kinds_and_processes() {
        let h = Hasher::random();
        assert_eq!(h.basic("a", "bc"), h.basic("a", "bc"));
        assert_ne!(h.basic("ab", "c"), h.basic("a", "bc"));
        assert_ne!(h.token("x"), h.basic("x", ""));
        assert_ne!(Hasher::random().token("x"), h.token("x"));
    }

    #[test]
    fn constant_time_eq_is_equality() {
        assert!(constant_time_eq(b"secret-token-123", b"secret-token-123"));
        assert!(!constant_time_eq(b"secret-token-123", b"secret-token-124"));
        assert!(!constant_time_eq(b"secret", b"secret-token-123"));
        assert!(constant_time_eq(b"", b""));
    }
}
