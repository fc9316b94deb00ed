//! HTTPS (`[server.tls]`, issue 13): TLS 1.2 and 1.3 with HTTP/2 by ALPN, certificates
//! rotated in place without dropping connections, a bad new file kept out, client
//! certificates required or optional; real clients (skopeo, containerd) trusting a CA the
//! test made. Certificates come from `common::tls` (rcgen).

mod common;

use common::app::TestApp;
use common::containerd::Containerd;
use common::external::{push_image, skopeo, DockerRegistry};
use common::fixture_upstream::{FixtureOptions, FixtureUpstream};
use common::images::{assert_layout_has, sha256_digest, Image};
use common::tls::{client, presented_certificate, Ca, Issued};
use common::wait_until_async;
use regcache::config::{ClientAuth, TlsConfig};
use std::path::Path;
use std::time::Duration;

/// Longest a reload or a pull may take on a loaded 2-core machine.
const DEADLINE: Duration = Duration::from_secs(30);

/// TLS settings for `server` (written into `dir`), with client certificates from `clients`.
fn tls_config(dir: &Path, server: &Issued, clients: Option<(&Ca, ClientAuth)>) -> TlsConfig {
    let (cert_file, key_file) = server.write(dir, "server");
    let (client_ca_file, client_auth) = match clients {
        Some((ca, auth)) => {
            let path = dir.join("clients-ca.crt");
            std::fs::write(&path, &ca.pem).unwrap();
            (Some(path), Some(auth))
        }
        None => (None, None),
    };
    TlsConfig {
        cert_file,
        key_file,
        client_ca_file,
        client_auth,
    }
}

fn https(app: &TestApp, path: &str) -> String {
    format!("https://{}{path}", app.server().addr())
}

/// HTTPS with HTTP/2 offered by ALPN and HTTP/1.1 beside it, on TLS 1.3 and 1.2.
#[tokio::test]
async fn https_serves_http2_and_http1_on_tls_13_and_12() {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let image = Image::new("tls", &[50_000], "2024-01-01T00:00:00Z");
    upstream.add_image("tls/app", Some("v1"), &image);
    let ca = Ca::new("test ca");
    let certs = tempfile::tempdir().unwrap();
    let tls = tls_config(certs.path(), &ca.server("regcache"), None);
    let app = TestApp::start_with(&[("fixture", &upstream.url())], |c| c.server.tls = Some(tls)).await;
    let base = https(&app, "");
    let h2 = client(&ca, None);
    common::app::pull_image(&h2, &base, "tls/app", "v1", &image).await;
    let resp = h2.get(https(&app, "/v2/")).send().await.unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2, "h2 chosen by ALPN");
    for max in [reqwest::tls::Version::TLS_1_2, reqwest::tls::Version::TLS_1_3] {
        let c = reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(ca.pem.as_bytes()).unwrap()])
            .http1_only()
            .tls_version_max(max)
            .build()
            .unwrap();
        let resp = c.get(https(&app, "/v2/")).send().await.unwrap();
        assert_eq!(
            (resp.status().as_u16(), resp.version()),
            (200, reqwest::Version::HTTP_11)
        );
    }
    // Plain HTTP on the TLS port is not served.
    let plain = reqwest::get(format!("http://{}/v2/", app.server().addr())).await;
    assert!(plain.is_err(), "plain HTTP is refused: {plain:?}");
}

/// skopeo pulls over TLS trusting the test's CA through `--src-cert-dir`, with
/// docker-registry as the upstream.
#[tokio::test]
async fn skopeo_pulls_over_tls_with_its_cert_dir() {
    let registry = DockerRegistry::start().await;
    let work = tempfile::tempdir().unwrap();
    let image = Image::new("skopeo-tls", &[300_000, 20_000], "2024-01-01T00:00:00Z");
    push_image(&registry, work.path(), "tls/app", &image).await;
    let ca = Ca::new("test ca");
    let certs = tempfile::tempdir().unwrap();
    let tls = tls_config(certs.path(), &ca.server("regcache"), None);
    let app = TestApp::start_with(&[("cncf", &registry.url())], |c| c.server.tls = Some(tls)).await;
    let cert_dir = tempfile::tempdir().unwrap();
    std::fs::write(cert_dir.path().join("ca.crt"), &ca.pem).unwrap();
    let out = work.path().join("pulled");
    let src = format!("docker://{}/tls/app:v1", app.server().addr());
    let dst = format!("oci:{}:v1", out.display());
    let cert_dir_arg = cert_dir.path().display().to_string();
    skopeo(&[
        "--insecure-policy",
        "copy",
        "--preserve-digests",
        "--src-cert-dir",
        &cert_dir_arg,
        &src,
        &dst,
    ])
    .await
    .unwrap_or_else(|e| panic!("skopeo over TLS: {e}"));
    let digests: Vec<&str> = std::iter::once(image.manifest.digest.as_str())
        .chain(image.blobs().map(|b| b.digest.as_str()))
        .collect();
    assert_layout_has(&out, &digests);
    // Without the CA, skopeo refuses the certificate.
    let empty = tempfile::tempdir().unwrap();
    let empty_arg = empty.path().display().to_string();
    let refused = skopeo(&[
        "--insecure-policy",
        "copy",
        "--src-cert-dir",
        &empty_arg,
        &src,
        &format!("oci:{}:v1", work.path().join("refused").display()),
    ])
    .await;
    assert!(refused.is_err(), "an unknown CA is refused");
}

/// containerd pulls through regcache over TLS, configured by `hosts.toml` with `ca` and a
/// `client` certificate that regcache requires.
#[tokio::test]
async fn containerd_pulls_over_tls_with_a_ca_and_a_client_certificate() {
    let registry = DockerRegistry::start().await;
    let work = tempfile::tempdir().unwrap();
    let image = Image::new("ctr-tls", &[200_000], "2024-01-01T00:00:00Z");
    push_image(&registry, work.path(), "tls/app", &image).await;
    let ca = Ca::new("server ca");
    let clients = Ca::new("clients ca");
    let certs = tempfile::tempdir().unwrap();
    let tls = tls_config(
        certs.path(),
        &ca.server("regcache"),
        Some((&clients, ClientAuth::Required)),
    );
    let app = TestApp::start_with(&[("cncf", &registry.url())], |c| c.server.tls = Some(tls)).await;
    let (client_cert, client_key) = clients
        .client("node-1", "node-1.example")
        .write(certs.path(), "client");
    let ca_path = certs.path().join("ca.crt");
    std::fs::write(&ca_path, &ca.pem).unwrap();
    let hosts = tempfile::tempdir().unwrap();
    let host_dir = hosts.path().join(registry.host_port());
    std::fs::create_dir_all(&host_dir).unwrap();
    std::fs::write(
        host_dir.join("hosts.toml"),
        format!(
            "server = \"{}\"\n\n[host.\"https://{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n  ca = \"{}\"\n  client = [[\"{}\", \"{}\"]]\n",
            registry.url(),
            app.server().addr(),
            ca_path.display(),
            client_cert.display(),
            client_key.display()
        ),
    )
    .unwrap();
    let containerd = Containerd::start().await;
    let reference = format!("{}/tls/app:v1", registry.host_port());
    let fetched = containerd.fetch(hosts.path(), &reference, &[]).await;
    let through_regcache = format!("https://{}/v2/", app.server().addr());
    assert!(
        fetched.requests.iter().all(|u| u.starts_with(&through_regcache)),
        "every request went to regcache over TLS: {:?}\n{}",
        fetched.requests,
        fetched.stderr
    );
    let stored = containerd.content_digests().await;
    for blob in image.blobs() {
        assert!(stored.contains(&blob.digest), "{} fetched", blob.digest);
    }
}

/// With `client_auth = "required"` a client without a certificate is refused in the
/// handshake, one with a certificate from another CA too; with `optional` both kinds of
/// client without one are served.
#[tokio::test]
async fn required_client_auth_refuses_a_client_without_a_certificate() {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let ca = Ca::new("server ca");
    let clients = Ca::new("clients ca");
    let stranger = Ca::new("another ca");
    let certs = tempfile::tempdir().unwrap();
    let tls = tls_config(
        certs.path(),
        &ca.server("regcache"),
        Some((&clients, ClientAuth::Required)),
    );
    let mut app = TestApp::start_with(&[("fixture", &upstream.url())], |c| c.server.tls = Some(tls)).await;
    let anonymous = client(&ca, None).get(https(&app, "/v2/")).send().await;
    assert!(anonymous.is_err(), "no certificate: refused");
    let wrong = client(&ca, Some(&stranger.client("x", "x.example")))
        .get(https(&app, "/v2/"))
        .send()
        .await;
    assert!(wrong.is_err(), "a certificate from another CA: refused");
    let known = client(&ca, Some(&clients.client("node-1", "node-1.example")))
        .get(https(&app, "/v2/"))
        .send()
        .await
        .unwrap();
    assert_eq!(known.status(), 200);

    app.restart_with(|c| {
        if let Some(tls) = c.server.tls.as_mut() {
            tls.client_auth = Some(ClientAuth::Optional);
        }
    })
    .await;
    let anonymous = client(&ca, None).get(https(&app, "/v2/")).send().await.unwrap();
    assert_eq!(anonymous.status(), 200, "optional: served without a certificate");
}

/// The certificate files are replaced (in place, then by a symlink swap as Kubernetes
/// does) while a client downloads a blob: the download completes on its connection, and
/// the next connection gets the new certificate. A broken new file keeps the old one.
#[tokio::test]
async fn certificates_are_reloaded_without_dropping_connections() {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let image = Image::new("rotate", &[24 << 20], "2024-01-01T00:00:00Z");
    upstream.add_image("rotate/app", Some("v1"), &image);
    let ca = Ca::new("test ca");
    let certs = tempfile::tempdir().unwrap();
    // Kubernetes layout: the configured paths are symlinks into a versioned directory.
    let v1 = certs.path().join("v1");
    std::fs::create_dir(&v1).unwrap();
    let first = ca.server("first");
    first.write(&v1, "tls");
    std::os::unix::fs::symlink("v1", certs.path().join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/tls.crt", certs.path().join("tls.crt")).unwrap();
    std::os::unix::fs::symlink("..data/tls.key", certs.path().join("tls.key")).unwrap();
    let tls = TlsConfig {
        cert_file: certs.path().join("tls.crt"),
        key_file: certs.path().join("tls.key"),
        client_ca_file: None,
        client_auth: None,
    };
    let app = TestApp::start_with(&[("fixture", &upstream.url())], |c| c.server.tls = Some(tls)).await;
    let addr = app.server().addr();
    assert_eq!(presented_certificate(addr, &ca).await, first.der);
    let c = client(&ca, None);
    common::app::pull_image(&c, &https(&app, ""), "rotate/app", "v1", &image).await;

    // A download in progress on a connection made with the first certificate.
    let layer = &image.layers[0];
    let mut download = c
        .get(https(&app, &format!("/v2/rotate/app/blobs/{}", layer.digest)))
        .send()
        .await
        .unwrap();
    let mut body = download.chunk().await.unwrap().unwrap().to_vec();

    // In place: cert-manager and certbot rewrite the files.
    let second = ca.server("second");
    second.write(&v1, "tls");
    let reloads = || app.server().tls_reloads().unwrap();
    wait_until_async("the rewritten certificate is loaded", DEADLINE, || async {
        reloads().loaded == 1
    })
    .await;
    assert_eq!(
        presented_certificate(addr, &ca).await,
        second.der,
        "the next connection gets it"
    );

    // A symlink swap to a new directory.
    let v2 = certs.path().join("v2");
    std::fs::create_dir(&v2).unwrap();
    let third = ca.server("third");
    third.write(&v2, "tls");
    std::os::unix::fs::symlink("v2", certs.path().join("..data_tmp")).unwrap();
    std::fs::rename(certs.path().join("..data_tmp"), certs.path().join("..data")).unwrap();
    wait_until_async("the swapped certificate is loaded", DEADLINE, || async {
        reloads().loaded == 2
    })
    .await;
    assert_eq!(presented_certificate(addr, &ca).await, third.der);

    // A broken file is refused and the last good certificate stays.
    std::fs::write(v2.join("tls.crt"), "-----BEGIN CERTIFICATE-----\nbroken\n").unwrap();
    wait_until_async("the broken certificate is refused", DEADLINE, || async {
        reloads().refused == 1
    })
    .await;
    assert_eq!(
        presented_certificate(addr, &ca).await,
        third.der,
        "the old one is kept"
    );
    // A key that does not fit the certificate is refused too.
    third.write(&v2, "tls");
    std::fs::write(v2.join("tls.key"), &second.key_pem).unwrap();
    wait_until_async("the mismatched key is refused", DEADLINE, || async {
        reloads().refused == 2
    })
    .await;
    assert_eq!(presented_certificate(addr, &ca).await, third.der);

    // The download started before all this completes on its connection.
    while let Some(chunk) = download.chunk().await.unwrap() {
        body.extend_from_slice(&chunk);
    }
    assert_eq!(
        sha256_digest(&body),
        layer.digest,
        "the download completed intact"
    );
}

/// A certificate or key that does not load fails start-up with an error naming its key,
/// before the database is created.
#[tokio::test]
async fn a_bad_certificate_at_start_up_names_the_key() {
    let ca = Ca::new("test ca");
    let certs = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().join("data");
    let good = tls_config(certs.path(), &ca.server("regcache"), None);
    let mut config = common::app::config_for(&[("fixture", "http://127.0.0.1:9")], &data_dir);
    let garbage = certs.path().join("garbage.pem");
    std::fs::write(&garbage, "not pem").unwrap();
    for (tls, key) in [
        (
            TlsConfig {
                cert_file: garbage.clone(),
                ..good.clone()
            },
            "server.tls.cert_file",
        ),
        (
            TlsConfig {
                key_file: garbage.clone(),
                ..good.clone()
            },
            "server.tls.key_file",
        ),
        (
            TlsConfig {
                key_file: certs.path().join("missing.key"),
                ..good.clone()
            },
            "server.tls.key_file",
        ),
    ] {
        config.server.tls = Some(tls);
        let err = regcache::server::start(config.clone())
            .await
            .unwrap_err()
            .to_string();
        assert!(err.starts_with(key), "{err}");
        assert!(!data_dir.exists(), "nothing was created: {err}");
    }
}
