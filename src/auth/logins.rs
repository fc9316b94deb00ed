//! The identity files: an htpasswd file (bcrypt hashes only) and bearer-token files, read
//! whole into one immutable `Logins` snapshot. Errors name the config key, the file and
//! the line. Also the files' fingerprints, which the reload loop compares. Blocking I/O:
//! callers run it on the blocking pool.

use super::credentials::{Hasher, Key};
use crate::config::AuthConfig;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Shortest bearer token accepted: the same bound as `admin.token`. With failed logins
/// slowed per address, 16 random characters cannot be guessed.
const TOKEN_MIN_CHARS: usize = 16;

/// An identity file that cannot be used. Changes nothing: at start-up the server does
/// not start; on reload the previous snapshot stays.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("config key `{key}`: cannot read {path}: {message}")]
    Read {
        key: String,
        path: String,
        message: String,
    },
    #[error("config key `{key}`: {path} line {line}: {message}")]
    Line {
        key: String,
        path: String,
        line: usize,
        message: String,
    },
}

/// Everything the identity files say, as of one read. Its `Debug` shows counts only: the
/// bcrypt hashes could be cracked offline (I9).
#[derive(Default)]
pub(super) struct Logins {
    /// Bumped by every successful reload; a verification done against an older snapshot
    /// is not cached.
    pub(super) generation: u64,
    /// htpasswd user → bcrypt hash.
    users: HashMap<String, String>,
    /// Keyed hash of a token → its identity.
    tokens: HashMap<Key, Arc<str>>,
}

/// How a Basic login is checked: the hash to verify against, and whether a match
/// counts (false: the user is unknown and `hash` is a decoy, so an unknown user costs
/// the same time as a wrong password). Its `Debug` leaves the hash out.
#[derive(Clone)]
pub(super) struct PasswordCheck {
    pub(super) hash: String,
    pub(super) counts: bool,
}

impl std::fmt::Debug for Logins {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Logins")
            .field("generation", &self.generation)
            .field("users", &self.users.len())
            .field("tokens", &self.tokens.len())
            .finish()
    }
}

impl std::fmt::Debug for PasswordCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PasswordCheck")
            .field("hash", &"<redacted>")
            .field("counts", &self.counts)
            .finish()
    }
}

impl Logins {
    pub(super) fn users(&self) -> usize {
        self.users.len()
    }

    pub(super) fn tokens(&self) -> usize {
        self.tokens.len()
    }

    /// What verifying `user`'s password takes; `None` when there is nothing to verify
    /// against (no htpasswd users at all).
    pub(super) fn password_check(&self, user: &str) -> Option<PasswordCheck> {
        match self.users.get(user) {
            Some(hash) => Some(PasswordCheck {
                hash: hash.clone(),
                counts: true,
            }),
            None => self.users.values().next().map(|decoy| PasswordCheck {
                hash: decoy.clone(),
                counts: false,
            }),
        }
    }

    pub(super) fn token_identity(&self, key: &Key) -> Option<Arc<str>> {
        self.tokens.get(key).cloned()
    }
}

/// Reads every identity file `auth` names.
pub(super) fn read(auth: &AuthConfig, hasher: &Hasher, generation: u64) -> Result<Logins, AuthError> {
    let mut logins = Logins {
        generation,
        ..Logins::default()
    };
    if let Some(path) = &auth.htpasswd_file {
        logins.users = parse_htpasswd(
            "auth.htpasswd_file",
            path,
            &read_file("auth.htpasswd_file", path)?,
        )?;
    }
    for (i, path) in auth.token_files.iter().enumerate() {
        let key = format!("auth.token_files[{i}]");
        let text = read_file(&key, path)?;
        parse_tokens(&key, path, &text, hasher, &mut logins.tokens)?;
    }
    Ok(logins)
}

fn read_file(key: &str, path: &Path) -> Result<String, AuthError> {
    std::fs::read_to_string(path).map_err(|e| AuthError::Read {
        key: key.to_owned(),
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

/// Non-empty lines that are not comments, numbered from 1.
fn lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim_end_matches('\r')))
        .filter(|(_, l)| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
}

fn parse_htpasswd(key: &str, path: &Path, text: &str) -> Result<HashMap<String, String>, AuthError> {
    let err = |line: usize, message: String| AuthError::Line {
        key: key.to_owned(),
        path: path.display().to_string(),
        line,
        message,
    };
    let mut users = HashMap::new();
    for (n, line) in lines(text) {
        let Some((user, hash)) = line.split_once(':') else {
            return Err(err(n, "expected user:hash".into()));
        };
        if user.is_empty() || user.chars().any(char::is_control) {
            return Err(err(n, "the user name is empty or has control characters".into()));
        }
        if let Some(kind) = not_bcrypt(hash) {
            return Err(err(
                n,
                format!("user {user:?} has {kind}; only bcrypt hashes are accepted (create them with `htpasswd -B`)"),
            ));
        }
        if users.insert(user.to_owned(), hash.to_owned()).is_some() {
            return Err(err(n, format!("user {user:?} appears twice")));
        }
    }
    Ok(users)
}

/// Why `hash` is not a bcrypt hash regcache can verify, naming what it looks like.
fn not_bcrypt(hash: &str) -> Option<&'static str> {
    if hash.starts_with("$2y$") || hash.starts_with("$2b$") || hash.starts_with("$2a$") {
        return match hash.parse::<bcrypt::HashParts>() {
            Ok(_) => None,
            Err(_) => Some("a malformed bcrypt hash"),
        };
    }
    Some(if hash.starts_with("$2x$") {
        "a $2x$ bcrypt hash (made by a buggy implementation; re-create it)"
    } else if hash.starts_with("$apr1$") {
        "an MD5 (apr1) hash"
    } else if hash.starts_with("{SHA}") {
        "a SHA-1 hash"
    } else if hash.starts_with("$5$") || hash.starts_with("$6$") {
        "a SHA-crypt hash"
    } else if hash.starts_with("$1$") {
        "an MD5-crypt hash"
    } else if hash.len() == 13 {
        "a crypt(3) DES hash"
    } else {
        "no recognisable hash (a plain-text password?)"
    })
}

fn parse_tokens(
    key: &str,
    path: &Path,
    text: &str,
    hasher: &Hasher,
    tokens: &mut HashMap<Key, Arc<str>>,
) -> Result<(), AuthError> {
    let err = |line: usize, message: String| AuthError::Line {
        key: key.to_owned(),
        path: path.display().to_string(),
        line,
        message,
    };
    for (n, line) in lines(text) {
        let Some((identity, token)) = line.split_once(':') else {
            return Err(err(n, "expected identity:token".into()));
        };
        let (identity, token) = (identity.trim(), token.trim());
        if identity.is_empty() || identity.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(err(
                n,
                "the identity is empty or has spaces or control characters".into(),
            ));
        }
        if token.chars().count() < TOKEN_MIN_CHARS
            || token.chars().any(|c| c.is_control() || c.is_whitespace())
        {
            return Err(err(
                n,
                format!(
                    "the token of {identity:?} must be at least {TOKEN_MIN_CHARS} characters, without spaces"
                ),
            ));
        }
        if tokens.insert(hasher.token(token), Arc::from(identity)).is_some() {
            // Not naming the other identity: the message would tell who holds the token.
            return Err(err(
                n,
                format!("the token of {identity:?} is also given to another identity"),
            ));
        }
    }
    Ok(())
}

/// What the reload loop compares: for each file, its device, inode, length and
/// modification time (a Kubernetes secret or `mv` swaps the inode; an edit in place
/// changes the time or length). `None` for a file that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Fingerprint(Vec<Option<FileStamp>>);

/// Device, inode, length, and modification time (seconds, nanoseconds) of one file.
type FileStamp = (u64, u64, u64, i64, i64);

pub(super) fn watched_files(auth: &AuthConfig) -> Vec<PathBuf> {
    auth.htpasswd_file
        .iter()
        .chain(auth.token_files.iter())
        .cloned()
        .collect()
}

pub(super) fn fingerprint(files: &[PathBuf]) -> Fingerprint {
    use std::os::unix::fs::MetadataExt as _;
    Fingerprint(
        files
            .iter()
            .map(|p| {
                std::fs::metadata(p)
                    .ok()
                    .map(|m| (m.dev(), m.ino(), m.len(), m.mtime(), m.mtime_nsec()))
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const BCRYPT_PW: &str = "$2y$04$74o27CduDymJvrIwcLYs7.d7UzGug2RxMYzEhhukfPIyyBYcsHtQ2";

    fn htpasswd(text: &str) -> Result<HashMap<String, String>, AuthError> {
        parse_htpasswd("auth.htpasswd_file", Path::new("/etc/htpasswd"), text)
    }

    fn line_error(text: &str) -> (usize, String) {
        match htpasswd(text).unwrap_err() {
            AuthError::Line { line, message, .. } => (line, message),
            other => panic!("{other}"),
        }
    }

    #[test]
    fn debug_output_carries_no_hash() {
        let logins = Logins {
            generation: 3,
            users: htpasswd(&format!("alice:{BCRYPT_PW}\n")).unwrap(),
            tokens: HashMap::new(),
        };
        let check = PasswordCheck {
            hash: BCRYPT_PW.to_owned(),
            counts: true,
        };
        for shown in [format!("{logins:?}"), format!("{check:?}")] {
            assert!(!shown.contains("$2y$"), "{shown}");
        }
        assert!(format!("{logins:?}").contains("users: 1"));
    }

    #[test]
    fn bcrypt_lines_load_comments_and_blanks_are_skipped() {
        let users = htpasswd(&format!("# users\n\nalice:{BCRYPT_PW}\r\nbob:{BCRYPT_PW}\n")).unwrap();
        assert_eq!(users.len(), 2);
        assert!(bcrypt::verify("pw", &users["alice"]).unwrap());
    }

    #[test]
    fn other_hash_kinds_are_refused_naming_line_and_kind() {
        for (hash, kind) in [
            ("$apr1$r31.....$HqJZimcKQFAMYayBlzkrA/", "MD5 (apr1)"),
            ("{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=", "SHA-1"),
            ("$6$salt$abc", "SHA-crypt"),
            ("rl0c4mG5sVF/2", "crypt(3) DES"),
            ("password", "plain-text"),
            (
                "$2x$04$74o27CduDymJvrIwcLYs7.d7UzGug2RxMYzEhhukfPIyyBYcsHtQ2",
                "$2x$",
            ),
            ("$2y$04$short", "malformed bcrypt"),
        ] {
            let (line, message) = line_error(&format!("alice:{BCRYPT_PW}\n# c\nbob:{hash}\n"));
            assert_eq!(line, 3, "{hash}");
            assert!(
                message.contains(kind) && message.contains("\"bob\""),
                "{hash}: {message}"
            );
            assert!(message.contains("htpasswd -B"), "{message}");
        }
        let e = htpasswd(&format!("alice:{BCRYPT_PW}\nalice:{BCRYPT_PW}\n")).unwrap_err();
        assert!(
            e.to_string().contains("auth.htpasswd_file") && e.to_string().contains("line 2"),
            "{e}"
        );
        assert_eq!(line_error("no colon here\n").0, 1);
    }

    #[test]
    fn tokens_need_an_identity_and_sixteen_characters_and_are_unique() {
        let h = Hasher::random();
        let parse = |text: &str| {
            let mut map = HashMap::new();
            parse_tokens("auth.token_files[0]", Path::new("/t"), text, &h, &mut map).map(|()| map)
        };
        let map = parse("ci-runner: 0123456789abcdef\n# old\nci-runner:fedcba9876543210\n").unwrap();
        assert_eq!(map.len(), 2, "one identity may hold two tokens (rotation)");
        assert_eq!(map[&h.token("0123456789abcdef")].as_ref(), "ci-runner");
        for bad in [
            "ci:short",
            "0123456789abcdef",
            ":0123456789abcdef",
            "a b:0123456789abcdef",
        ] {
            let e = parse(bad).unwrap_err();
            assert!(e.to_string().contains("line 1"), "{bad}: {e}");
            assert!(
                !e.to_string().contains("0123456789abcdef"),
                "the token is not echoed: {e}"
            );
        }
        let e = parse("a:0123456789abcdef\nb:0123456789abcdef\n").unwrap_err();
        assert!(
            e.to_string().contains("line 2") && !e.to_string().contains("\"a\""),
            "{e}"
        );
    }

    #[test]
    fn unknown_users_are_checked_against_a_decoy() {
        let logins = Logins {
            users: HashMap::from([("alice".to_owned(), BCRYPT_PW.to_owned())]),
            ..Logins::default()
        };
        assert!(logins.password_check("alice").unwrap().counts);
        let decoy = logins.password_check("mallory").unwrap();
        assert!(!decoy.counts);
        assert_eq!(decoy.hash, BCRYPT_PW);
        assert!(Logins::default().password_check("alice").is_none());
    }
}
