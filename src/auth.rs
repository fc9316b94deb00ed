//! Who may pull what (`[auth]`): identities from an htpasswd file (bcrypt) and bearer-token
//! files, rules over `upstream/repository` globs, and the one admin check the admin API
//! (and any other operator page) uses. Credentials are checked here and never forwarded
//! or logged (I9). bcrypt runs on the blocking pool, a few at a time, once per
//! credential until the files change; failed password logins slow their address down.
//! Depends on `config` and `glob` only; the HTTP layers call it.

mod credentials;
mod logins;
mod passwords;
mod reload;
mod rules;
mod throttle;
mod verified;

pub use credentials::constant_time_eq;
pub use logins::AuthError;

use crate::config::{AuthConfig, CertIdentity, Config, Secret};
use crate::identity::ClientCert;
use axum::extract::ConnectInfo;
use axum::http::{Extensions, HeaderMap};
use credentials::{Hasher, Key, Presented};
use logins::{Fingerprint, Logins};
use rules::{Rules, Subject};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;
use throttle::{AddrKey, Throttle};
use tokio::sync::{OnceCell, Semaphore};
use verified::Verified;

/// The challenge of every 401: Basic is what Docker, containerd, Podman and skopeo all
/// answer with the login they hold for the host.
pub const CHALLENGE: &str = "Basic realm=\"regcache\"";
/// The challenges of an admin 401: the admin token as a bearer token, and a Basic login
/// (an identity, or the admin token as the password, which a browser can ask for).
pub const ADMIN_CHALLENGES: [&str; 2] = [
    "Bearer realm=\"regcache-admin\"",
    "Basic realm=\"regcache-admin\"",
];

/// Who made a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Who {
    /// No credentials (or access control is off).
    Anonymous,
    Identity {
        name: Arc<str>,
        via: Via,
    },
}

/// How an identity proved itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Password,
    Token,
    Certificate,
}

impl Who {
    fn subject(&self) -> Subject<'_> {
        match self {
            Self::Anonymous => Subject::Anonymous,
            Self::Identity { name, .. } => Subject::Identity(name),
        }
    }
}

/// Why credentials were not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Wrong, unknown or malformed credentials: 401.
    BadLogin,
    /// Too many logins from this address, or waiting for bcrypt: 429.
    Busy { retry_after: Duration },
}

/// The answer of [`Access::admin_access`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminAccess {
    /// The admin token, or an identity with `admin`.
    Granted(AdminUser),
    /// No admin token configured and no rule gives `admin`: 403, and say how to enable it.
    Disabled,
    /// No or wrong credentials: 401 with `challenges`.
    Unauthenticated,
    /// A valid identity without `admin`: 403.
    Forbidden {
        identity: Arc<str>,
    },
    Busy {
        retry_after: Duration,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminUser {
    Token,
    Identity(Arc<str>),
}

/// One bcrypt check: its outcome, shared by every request waiting for it.
type PasswordCheck = OnceCell<Result<Arc<str>, Refused>>;

/// Access control, shared by every request.
#[derive(Debug)]
pub struct Access {
    auth: AuthConfig,
    /// Whether any client can be an identity (logins or named client certificates).
    identities: bool,
    /// What names the identity of a verified client certificate, if anything.
    cert_identity: Option<CertIdentity>,
    rules: Rules,
    admin_token: Option<Secret>,
    hasher: Hasher,
    /// The identity files as last read; swapped whole on reload.
    logins: RwLock<Arc<Logins>>,
    fingerprint: Mutex<Fingerprint>,
    verified: Arc<Mutex<Verified>>,
    throttle: Arc<Mutex<Throttle>>,
    /// bcrypt checks in progress, one per credential however many requests carry it.
    checking: Mutex<HashMap<Key, Arc<PasswordCheck>>>,
    bcrypt_slots: Arc<Semaphore>,
    bcrypt_waiting: AtomicUsize,
    /// bcrypt verifications run so far (tests and the benchmark read it).
    password_checks: AtomicU64,
    /// Changes of the identity files that could not be used (the previous logins stayed).
    reload_failures: AtomicU64,
}

/// A std mutex never held across an await; poisoning only means a request panicked,
/// which leaves these maps consistent.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Whether `Authorization` is `Bearer <token>` (the scheme in any case; compared in
/// constant time), read by the one parser every login goes through.
pub fn bearer_matches(headers: &HeaderMap, token: &Secret) -> bool {
    match Presented::from_header(headers.get(axum::http::header::AUTHORIZATION)) {
        Presented::Bearer(offered) => constant_time_eq(offered.as_bytes(), token.expose().as_bytes()),
        _ => false,
    }
}

/// The client's address and port: `ConnectInfo`, which the server's listener inserts into
/// every request (the one place that knows where it comes from; the access log uses it
/// too).
pub fn client_addr(extensions: &Extensions) -> Option<SocketAddr> {
    extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0)
}

/// The client's IP address (see [`client_addr`]).
pub fn client_ip(extensions: &Extensions) -> Option<IpAddr> {
    client_addr(extensions).map(|a| a.ip())
}

/// Where a login came from: its address for the log, and its throttle entry. Clients
/// whose address is unknown share one entry (the strict direction).
#[derive(Debug, Clone, Copy)]
struct Client {
    ip: Option<IpAddr>,
    key: AddrKey,
}

impl Client {
    fn of(extensions: &Extensions) -> Self {
        let ip = client_ip(extensions);
        Self {
            ip,
            key: AddrKey::new(ip.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))),
        }
    }
}

impl std::fmt::Display for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.ip {
            Some(ip) => write!(f, "{ip}"),
            None => f.write_str("-"),
        }
    }
}

impl Access {
    /// Reads the identity files `config` names; an unusable file is an error naming the
    /// key, the file and the line.
    pub async fn load(config: &Config) -> Result<Arc<Self>, AuthError> {
        let auth = config.auth.clone();
        let hasher = Hasher::random();
        let (logins, fingerprint) = {
            let (auth, hasher) = (auth.clone(), hasher.clone());
            tokio::task::spawn_blocking(move || {
                let fingerprint = logins::fingerprint(&logins::watched_files(&auth));
                logins::read(&auth, &hasher, 0).map(|l| (l, fingerprint))
            })
            .await
            .map_err(|e| AuthError::Read {
                key: "auth".into(),
                path: String::new(),
                message: e.to_string(),
            })??
        };
        Ok(Arc::new(Self {
            rules: Rules::new(config),
            identities: config.has_identity_source(),
            cert_identity: config.cert_identity(),
            auth,
            admin_token: config.admin.token.clone(),
            hasher,
            logins: RwLock::new(Arc::new(logins)),
            fingerprint: Mutex::new(fingerprint),
            verified: Arc::default(),
            throttle: Arc::default(),
            checking: Mutex::default(),
            bcrypt_slots: Arc::new(Semaphore::new(passwords::bcrypt_slots())),
            bcrypt_waiting: AtomicUsize::new(0),
            password_checks: AtomicU64::new(0),
            reload_failures: AtomicU64::new(0),
        }))
    }

    /// Reads the identity files without starting anything (`check-config`): how many
    /// users and tokens they hold, or what is wrong with them.
    pub fn check_files(config: &Config) -> Result<(usize, usize), AuthError> {
        let l = logins::read(&config.auth, &Hasher::random(), 0)?;
        Ok((l.users(), l.tokens()))
    }

    /// Whether clients can log in with a password or token (an htpasswd file or token
    /// files are configured): then an anonymous client is asked to log in.
    pub fn has_logins(&self) -> bool {
        self.auth.has_logins()
    }

    /// How many bcrypt verifications have run: one per credential until the identity
    /// files change, however many requests carry it.
    pub fn password_checks(&self) -> u64 {
        self.password_checks.load(Ordering::Relaxed)
    }

    /// The identity files' generation: 0 as read at start-up, one more per reload.
    pub fn generation(&self) -> u64 {
        self.logins().generation
    }

    /// How many changes of the identity files were refused (a bad file; the previous
    /// logins stayed in force).
    pub fn reload_failures(&self) -> u64 {
        self.reload_failures.load(Ordering::Relaxed)
    }

    fn logins(&self) -> Arc<Logins> {
        self.logins
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Who sent a request with these headers, on a connection with these extensions.
    /// Credentials in `Authorization` win over a client certificate. Without logins the
    /// header is ignored whatever it carries (clients send stored logins to any
    /// registry), and without any identity source every request is anonymous.
    pub async fn authenticate(&self, headers: &HeaderMap, extensions: &Extensions) -> Result<Who, Refused> {
        if !self.identities {
            return Ok(Who::Anonymous);
        }
        if self.has_logins() {
            let client = Client::of(extensions);
            match Presented::from_header(headers.get(axum::http::header::AUTHORIZATION)) {
                Presented::Nothing => {}
                Presented::Basic { user, password } => {
                    let name = self.check_password(user, password, client).await?;
                    return Ok(Who::Identity {
                        name,
                        via: Via::Password,
                    });
                }
                Presented::Bearer(token) => {
                    return match self.logins().token_identity(&self.hasher.token(&token)) {
                        Some(name) => Ok(Who::Identity {
                            name,
                            via: Via::Token,
                        }),
                        None => Err(self.failed(client, "bearer")),
                    }
                }
                Presented::Malformed => return Err(self.failed(client, "malformed")),
            }
        }
        Ok(self.certificate_identity(extensions).unwrap_or(Who::Anonymous))
    }

    /// The identity a verified client certificate names (`auth.cert_identity`). A
    /// certificate without that part names none: its client is anonymous.
    fn certificate_identity(&self, extensions: &Extensions) -> Option<Who> {
        let part = self.cert_identity?;
        let cert = extensions.get::<Arc<ClientCert>>()?;
        let name = match part {
            CertIdentity::Cn => cert.common_name.as_ref(),
            CertIdentity::SanDns => cert.dns_names.first(),
            CertIdentity::SanEmail => cert.emails.first(),
            CertIdentity::SanUri => cert.uris.first(),
        };
        let Some(name) = name.filter(|n| !n.is_empty()) else {
            tracing::debug!(auth.cert_identity = ?part, "the client certificate names no identity; the client is anonymous");
            return None;
        };
        Some(Who::Identity {
            name: Arc::from(name.as_str()),
            via: Via::Certificate,
        })
    }

    /// Whether `who` may pull `repo` (as the upstream knows it) through the upstream
    /// named `upstream`.
    pub fn may_pull(&self, who: &Who, upstream: &str, repo: &str) -> bool {
        self.rules.may_pull(who.subject(), upstream, repo)
    }

    /// A bearer token or header that is not valid. Not slowed: tokens (and the admin
    /// token) have at least 16 characters, which no one guesses online; the throttle is
    /// for passwords, which people choose.
    fn failed(&self, client: Client, kind: &'static str) -> Refused {
        tracing::info!(client.addr = %client, auth.kind = kind, "login failed");
        Refused::BadLogin
    }

    /// The one admin check: the admin API uses it, and so should any other operator
    /// endpoint (status page, metrics). Grants the admin token (as `Bearer <token>`, or as
    /// the password of a Basic login with any user name, so a browser can ask for it),
    /// or an identity that a rule gives `admin`.
    pub async fn admin_access(&self, headers: &HeaderMap, extensions: &Extensions) -> AdminAccess {
        if self.admin_token.is_none() && !self.rules.any_admin() {
            return AdminAccess::Disabled;
        }
        let presented = Presented::from_header(headers.get(axum::http::header::AUTHORIZATION));
        if let Some(token) = &self.admin_token {
            let offered = match &presented {
                Presented::Bearer(t) => Some(t.as_str()),
                Presented::Basic { password, .. } => Some(password.as_str()),
                Presented::Nothing | Presented::Malformed => None,
            };
            if offered.is_some_and(|o| credentials::constant_time_eq(o.as_bytes(), token.expose().as_bytes()))
            {
                return AdminAccess::Granted(AdminUser::Token);
            }
        }
        // A client certificate naming an admin identity is admitted whatever header it
        // carries when there are no logins (`authenticate` then ignores the header, as
        // it does for pulls); a header that is not the token, and no identity, is a
        // failed admin login.
        let who = match self.authenticate(headers, extensions).await {
            Ok(Who::Anonymous) if !self.has_logins() && presented != Presented::Nothing => {
                Err(self.failed(Client::of(extensions), "admin-token"))
            }
            who => who,
        };
        match who {
            Ok(Who::Anonymous) | Err(Refused::BadLogin) => AdminAccess::Unauthenticated,
            Err(Refused::Busy { retry_after }) => AdminAccess::Busy { retry_after },
            Ok(Who::Identity { name, .. }) => {
                if self.rules.is_admin(Subject::Identity(&name)) {
                    AdminAccess::Granted(AdminUser::Identity(name))
                } else {
                    AdminAccess::Forbidden { identity: name }
                }
            }
        }
    }

    /// The upstreams with credentials that anonymous clients may pull through: what the
    /// start-up warning names when the listener is reachable from other machines.
    pub fn anonymous_upstreams_with_credentials<'a>(&self, config: &'a Config) -> Vec<&'a str> {
        config
            .upstream
            .iter()
            .filter(|u| u.username.is_some())
            .filter(|u| self.rules.anonymous_may_pull_from(&u.name))
            .map(|u| u.name.as_str())
            .collect()
    }
}
