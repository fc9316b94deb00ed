//! TLS for the listeners (`[server.tls]`): rustls with the aws-lc-rs provider reqwest
//! already brings, TLS 1.2 and 1.3 only, HTTP/2 and HTTP/1.1 offered by ALPN, optional or
//! required client certificates. The certificate, key and client CA files are read again
//! every `CHECK_EVERY`; a change that loads replaces the configuration new connections
//! get (open ones keep theirs), one that does not keeps the old and is logged once.

use super::ServerError;
use crate::config::{ClientAuth, TlsConfig};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How often the files are compared with what was loaded. Reading three small files is
/// cheap; rotation tools (cert-manager, certbot, a Kubernetes secret's symlink swap) give
/// no signal we could wait on instead, and a few seconds' delay is harmless.
const CHECK_EVERY: Duration = Duration::from_secs(2);

/// The current TLS configuration of the listeners and what reloading it did.
#[derive(Debug)]
pub(crate) struct Tls {
    settings: TlsConfig,
    current: RwLock<Arc<rustls::ServerConfig>>,
    /// A hash of the file contents last looked at (loaded or refused), so one bad file is
    /// reported once, not every check.
    seen: Mutex<u64>,
    loaded: AtomicU64,
    refused: AtomicU64,
}

/// How many reloads succeeded and how many kept the old certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TlsReloads {
    pub loaded: u64,
    pub refused: u64,
}

/// The files' contents, or why one could not be read.
struct Files {
    cert: Result<Vec<u8>, String>,
    key: Result<Vec<u8>, String>,
    client_ca: Option<Result<Vec<u8>, String>>,
}

impl Files {
    fn read(settings: &TlsConfig) -> Files {
        let read =
            |path: &std::path::Path| std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()));
        Files {
            cert: read(&settings.cert_file),
            key: read(&settings.key_file),
            client_ca: settings.client_ca_file.as_deref().map(read),
        }
    }

    fn fingerprint(&self) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.cert.hash(&mut h);
        self.key.hash(&mut h);
        self.client_ca.hash(&mut h);
        h.finish()
    }
}

impl Tls {
    /// Loads the files; an error names the key of the file at fault.
    pub(crate) async fn load(settings: &TlsConfig) -> Result<Arc<Tls>, ServerError> {
        let settings = settings.clone();
        tokio::task::spawn_blocking(move || {
            let files = Files::read(&settings);
            let config =
                build(&settings, &files).map_err(|(key, message)| ServerError::Tls { key, message })?;
            Ok(Arc::new(Tls {
                current: RwLock::new(Arc::new(config)),
                seen: Mutex::new(files.fingerprint()),
                settings,
                loaded: AtomicU64::new(0),
                refused: AtomicU64::new(0),
            }))
        })
        .await
        .map_err(|e| ServerError::Task(e.to_string()))?
    }

    /// The acceptor for a new connection: the configuration loaded last.
    pub(crate) fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let config = self
            .current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        tokio_rustls::TlsAcceptor::from(config)
    }

    pub(crate) fn reloads(&self) -> TlsReloads {
        TlsReloads {
            loaded: self.loaded.load(Ordering::Acquire),
            refused: self.refused.load(Ordering::Acquire),
        }
    }

    /// Checks the files every `CHECK_EVERY` until shutdown.
    pub(crate) async fn watch(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(CHECK_EVERY) => {}
            }
            let this = self.clone();
            if let Err(e) = tokio::task::spawn_blocking(move || this.check()).await {
                tracing::error!(error = %e, "checking the TLS files failed");
            }
        }
    }

    /// Reloads when the files changed since they were last looked at.
    fn check(&self) {
        let files = Files::read(&self.settings);
        let fingerprint = files.fingerprint();
        {
            let mut seen = self
                .seen
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if *seen == fingerprint {
                return;
            }
            *seen = fingerprint;
        }
        match build(&self.settings, &files) {
            Ok(config) => {
                *self
                    .current
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(config);
                self.loaded.fetch_add(1, Ordering::AcqRel);
                tracing::info!(
                    tls.cert_file = %self.settings.cert_file.display(),
                    "reloaded the TLS certificate; new connections use it"
                );
            }
            Err((key, message)) => {
                self.refused.fetch_add(1, Ordering::AcqRel);
                tracing::warn!(
                    config.key = key,
                    error = %message,
                    "the changed TLS files do not load; still serving the previous certificate"
                );
            }
        }
    }
}

/// The rustls configuration from the files' contents; an error names the config key.
fn build(settings: &TlsConfig, files: &Files) -> Result<rustls::ServerConfig, (&'static str, String)> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let cert_pem = files
        .cert
        .as_ref()
        .map_err(|e| ("server.tls.cert_file", e.clone()))?;
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            (
                "server.tls.cert_file",
                format!("{}: {e}", settings.cert_file.display()),
            )
        })?;
    if chain.is_empty() {
        return Err((
            "server.tls.cert_file",
            format!("{}: no PEM certificate in it", settings.cert_file.display()),
        ));
    }
    let key_pem = files
        .key
        .as_ref()
        .map_err(|e| ("server.tls.key_file", e.clone()))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| {
        (
            "server.tls.key_file",
            format!("{}: {e}", settings.key_file.display()),
        )
    })?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| ("server.tls", e.to_string()))?;
    let builder = match (&files.client_ca, &settings.client_ca_file) {
        (Some(ca_pem), Some(path)) => {
            let ca_pem = ca_pem
                .as_ref()
                .map_err(|e| ("server.tls.client_ca_file", e.clone()))?;
            let mut roots = rustls::RootCertStore::empty();
            for ca in CertificateDer::pem_slice_iter(ca_pem) {
                let ca = ca.map_err(|e| ("server.tls.client_ca_file", format!("{}: {e}", path.display())))?;
                roots
                    .add(ca)
                    .map_err(|e| ("server.tls.client_ca_file", format!("{}: {e}", path.display())))?;
            }
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = match settings.client_auth.unwrap_or(ClientAuth::Required) {
                ClientAuth::Optional => verifier.allow_unauthenticated(),
                ClientAuth::Required => verifier,
            };
            let verifier = verifier
                .build()
                .map_err(|e| ("server.tls.client_ca_file", format!("{}: {e}", path.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
        _ => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| {
        (
            "server.tls.key_file",
            format!(
                "{} does not fit {}: {e}",
                settings.key_file.display(),
                settings.cert_file.display()
            ),
        )
    })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::ClientCert;

    fn issue(cn: &str, sans: Vec<String>, ca: &rcgen::Issuer<'_, rcgen::KeyPair>) -> (String, String) {
        let mut params = rcgen::CertificateParams::new(sans).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, cn);
        let key = rcgen::KeyPair::generate().unwrap();
        (params.signed_by(&key, ca).unwrap().pem(), key.serialize_pem())
    }

    fn ca(name: &str) -> (String, rcgen::Issuer<'static, rcgen::KeyPair>) {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let key = rcgen::KeyPair::generate().unwrap();
        let pem = params.self_signed(&key).unwrap().pem();
        (pem, rcgen::Issuer::new(params, key))
    }

    /// The verified client certificate's identity reaches the handlers as an
    /// `Arc<ClientCert>` in the request's extensions; without a certificate there is none.
    #[tokio::test]
    async fn the_client_identity_is_in_each_request() {
        let dir = tempfile::tempdir().unwrap();
        let (server_ca, server_issuer) = ca("server ca");
        let (client_ca, client_issuer) = ca("client ca");
        let (cert, key) = issue("regcache", vec!["127.0.0.1".into()], &server_issuer);
        std::fs::write(dir.path().join("tls.crt"), cert).unwrap();
        std::fs::write(dir.path().join("tls.key"), key).unwrap();
        std::fs::write(dir.path().join("clients.crt"), client_ca).unwrap();
        let settings = TlsConfig {
            cert_file: dir.path().join("tls.crt"),
            key_file: dir.path().join("tls.key"),
            client_ca_file: Some(dir.path().join("clients.crt")),
            client_auth: Some(ClientAuth::Optional),
        };
        let tls = Tls::load(&settings).await.unwrap();
        let limits = super::super::listener::Limits::from_config(&crate::config::ServerConfig::default());
        let listener = super::super::listener::Serving::bind("server.listen", "127.0.0.1:0", limits)
            .await
            .unwrap()
            .with_tls(Some(tls));
        let addr = listener.local_addr();
        let app = axum::Router::new().route(
            "/who",
            axum::routing::get(|req: axum::extract::Request| async move {
                match req.extensions().get::<Arc<ClientCert>>() {
                    Some(id) => format!("{:?} {:?}", id.common_name, id.dns_names),
                    None => "anonymous".to_owned(),
                }
            }),
        );
        let shutdown = CancellationToken::new();
        let served = tokio::spawn(listener.run(app, shutdown.clone()));
        let root = reqwest::Certificate::from_pem(server_ca.as_bytes()).unwrap();
        let (client_cert, client_key) = issue("runner-1", vec!["runner-1.ci".into()], &client_issuer);
        let identity = reqwest::Identity::from_pem(format!("{client_cert}{client_key}").as_bytes()).unwrap();
        let url = format!("https://{addr}/who");
        let with_cert = reqwest::Client::builder()
            .tls_certs_only([root.clone()])
            .identity(identity)
            .build()
            .unwrap();
        let body = with_cert.get(&url).send().await.unwrap().text().await.unwrap();
        assert_eq!(body, r#"Some("runner-1") ["runner-1.ci"]"#);
        let without = reqwest::Client::builder().tls_certs_only([root]).build().unwrap();
        let body = without.get(&url).send().await.unwrap().text().await.unwrap();
        assert_eq!(body, "anonymous");
        shutdown.cancel();
        served.await.unwrap();
    }
}
