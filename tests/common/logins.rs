//! Identity files for `[auth]` tests, made the way an operator makes them: htpasswd lines
//! by `htpasswd -B` (Debian's apache2-utils), token files as `identity:token` lines. A
//! file is replaced by writing a new one beside it and renaming it over the old, as
//! editors, `htpasswd` itself and Kubernetes secret updates do.

use regcache::config::AuthRule;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::external::require_tool;

/// `user:hash` from `htpasswd -nbB -C COST user password` (cost 5 is htpasswd's default).
pub fn htpasswd_line(user: &str, password: &str, cost: u32) -> String {
    let out = Command::new(require_tool("htpasswd"))
        .args(["-nbB", "-C", &cost.to_string(), user, password])
        .output()
        .expect("running htpasswd");
    assert!(
        out.status.success(),
        "htpasswd: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("htpasswd prints text")
        .trim()
        .to_owned()
}

/// Writes `text` to `path` through a temporary file renamed over it.
pub fn replace_file(path: &Path, text: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).unwrap_or_else(|e| panic!("writing {}: {e}", tmp.display()));
    std::fs::rename(&tmp, path).unwrap_or_else(|e| panic!("renaming onto {}: {e}", path.display()));
}

/// An htpasswd file and a token file in a temporary directory.
#[derive(Debug)]
pub struct IdentityFiles {
    pub htpasswd: PathBuf,
    pub tokens: PathBuf,
    _dir: tempfile::TempDir,
}

impl IdentityFiles {
    /// `users` as (name, password), hashed with bcrypt cost 5; `tokens` as (identity, token).
    pub fn new(users: &[(&str, &str)], tokens: &[(&str, &str)]) -> IdentityFiles {
        let dir = tempfile::tempdir().expect("temp dir");
        let files = IdentityFiles {
            htpasswd: dir.path().join("htpasswd"),
            tokens: dir.path().join("tokens"),
            _dir: dir,
        };
        files.set_users(users);
        files.set_tokens(tokens);
        files
    }

    /// Replaces the htpasswd file with one holding exactly `users`.
    pub fn set_users(&self, users: &[(&str, &str)]) {
        let text: String = users
            .iter()
            .map(|(u, p)| format!("{}\n", htpasswd_line(u, p, 5)))
            .collect();
        replace_file(&self.htpasswd, &text);
    }

    /// Replaces the token file with one holding exactly `tokens`.
    pub fn set_tokens(&self, tokens: &[(&str, &str)]) {
        let text: String = tokens.iter().map(|(i, t)| format!("{i}:{t}\n")).collect();
        replace_file(&self.tokens, &text);
    }
}

/// An `[[auth.rule]]` giving `identities` pull on the `pull` globs, and admin if `admin`.
pub fn rule(identities: &[&str], pull: &[&str], admin: bool) -> AuthRule {
    AuthRule {
        identities: identities.iter().map(|s| (*s).to_owned()).collect(),
        pull: pull.iter().map(|s| (*s).to_owned()).collect(),
        admin,
        ..AuthRule::default()
    }
}
