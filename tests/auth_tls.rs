//! `[auth]` over TLS (`[server.tls]`): client certificates as identities (`cert_identity`,
//! the CN or a SAN), logins and tokens on a TLS listener, and real clients: skopeo with
//! `--src-cert-dir` (the CA, and a client certificate) and `--src-creds`; containerd through
//! `hosts.toml` with `ca`, with a `header` bearer token, and with a `client` certificate
//! as the identity. Certificates come from `common::tls` (rcgen); the upstream is the CNCF
//! registry (`docker-registry`) for the real clients, the fixture otherwise.

mod common;

use common::app::{config_for, error_code, TestApp};
use common::containerd::{write_hosts_toml_with, Containerd};
use common::external::{push_image, skopeo, DockerRegistry};
use common::fixture_upstream::{FixtureOptions, FixtureUpstream};
use common::images::{assert_layout_has, Image, ACCEPT_ALL_MANIFESTS};
use common::logins::{rule, IdentityFiles};
use common::tls::{client, Ca, Issued};
use regcache::config::{CertIdentity, ClientAuth, Config, TlsConfig};
use reqwest::header::{ACCEPT, AUTHORIZATION};
use std::path::Path;

const TOKEN: &str = "ci-runner-token-0123456789";

/// The server certificate from `ca` and, with `clients`, client certificates from that CA
/// (`client_auth` optional, so a client without one reaches the authorization).
fn tls(dir: &Path, ca: &Ca, clients: Option<&Ca>) -> TlsConfig {
    let (cert_file, key_file) = ca.server("regcache").write(dir, "server");
    let client_ca_file = clients.map(|c| {
        let path = dir.join("clients-ca.crt");
        std::fs::write(&path, &c.pem).unwrap();
        path
    });
    TlsConfig {
        cert_file,
        key_file,
        client_auth: client_ca_file.as_ref().map(|_| ClientAuth::Optional),
        client_ca_file,
    }
}

fn https(app: &TestApp, path: &str) -> String {
    format!("https://{}{path}", app.server().addr())
}

async fn get(c: &reqwest::Client, url: &str, authorization: Option<&str>) -> reqwest::Response {
    let mut req = c.get(url).header(ACCEPT, ACCEPT_ALL_MANIFESTS);
    if let Some(a) = authorization {
        req = req.header(AUTHORIZATION, a);
    }
    req.send().await.expect("request to regcache")
}

struct Fixture {
    _upstream: FixtureUpstream,
    certs: tempfile::TempDir,
    ca: Ca,
    clients: Ca,
}

/// A fixture upstream with `team/app` and `team/secret`, and the two CAs.
async fn fixture() -> (Fixture, String) {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let image = Image::new("auth-tls", &[2000], "2024-05-06T07:08:09Z");
    upstream.add_image("team/app", Some("v1"), &image);
    upstream.add_image("team/secret", Some("v1"), &image);
    let url = upstream.url();
    (
        Fixture {
            _upstream: upstream,
            certs: tempfile::tempdir().unwrap(),
            ca: Ca::new("server ca"),
            clients: Ca::new("clients ca"),
        },
        url,
    )
}

#[tokio::test]
async fn a_client_certificate_names_its_identity_by_cn_by_default() {
    let (f, url) = fixture().await;
    let tls = tls(f.certs.path(), &f.ca, Some(&f.clients));
    let files = IdentityFiles::new(&[("alice", "alice-pw")], &[]);
    let app = TestApp::start_with(&[("fixture", &url)], |c| {
        c.server.tls = Some(tls);
        c.auth.htpasswd_file = Some(files.htpasswd.clone());
        c.auth.rule = vec![
            rule(&["node-1"], &["fixture/team/app"], false),
            rule(&["node-admin"], &[], true),
        ];
    })
    .await;
    let app_manifest = https(&app, "/v2/team/app/manifests/v1");
    let node1 = client(&f.ca, Some(&f.clients.client("node-1", "node-1.example")));
    assert_eq!(get(&node1, &app_manifest, None).await.status(), 200);
    let resp = get(&node1, &https(&app, "/v2/team/secret/manifests/v1"), None).await;
    assert_eq!(error_code(resp).await, (403, "DENIED".to_owned()));
    // Another CN from the same CA is another identity, with no rule.
    let node2 = client(&f.ca, Some(&f.clients.client("node-2", "node-1.example")));
    assert_eq!(error_code(get(&node2, &app_manifest, None).await).await.0, 403);
    // No certificate: anonymous, asked to log in since logins exist.
    let none = client(&f.ca, None);
    assert_eq!(error_code(get(&none, &app_manifest, None).await).await.0, 401);
    // Credentials in the header win over the certificate: a wrong one is refused.
    let wrong = format!("Basic {}", base64_of("alice:nope"));
    assert_eq!(get(&node1, &app_manifest, Some(&wrong)).await.status(), 401);
    // The admin API takes a certificate identity with admin.
    let admin = client(&f.ca, Some(&f.clients.client("node-admin", "x.example")));
    assert_eq!(
        admin
            .get(https(&app, "/api/v1/jobs"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        node1
            .get(https(&app, "/api/v1/jobs"))
            .send()
            .await
            .unwrap()
            .status(),
        403
    );
}

fn base64_of(text: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(text)
}

#[tokio::test]
async fn cert_identity_can_name_a_san_instead() {
    let (f, url) = fixture().await;
    let tls = tls(f.certs.path(), &f.ca, Some(&f.clients));
    let app = TestApp::start_with(&[("fixture", &url)], |c| {
        c.server.tls = Some(tls);
        c.auth.cert_identity = Some(CertIdentity::SanDns);
        c.auth.rule = vec![rule(&["node-1.example"], &["fixture/team/*"], false)];
    })
    .await;
    let manifest = https(&app, "/v2/team/app/manifests/v1");
    let by_san = client(&f.ca, Some(&f.clients.client("whatever-cn", "node-1.example")));
    assert_eq!(get(&by_san, &manifest, None).await.status(), 200);
    // The CN is not looked at: a CN equal to the SAN the rule names gets nothing.
    let by_cn = client(&f.ca, Some(&f.clients.client("node-1.example", "other.example")));
    let resp = get(&by_cn, &manifest, None).await;
    assert_eq!(
        error_code(resp).await,
        (403, "DENIED".to_owned()),
        "no logins: 403, not 401"
    );
}

#[tokio::test]
async fn an_admin_certificate_is_admitted_whatever_header_it_carries() {
    // An admin token and an admin identity by certificate, but no logins: a header
    // that is not the token (a browser's stale login, a pull token) must not cost the
    // certificate its admin rights, and without the certificate it is a failed login.
    let (f, url) = fixture().await;
    let tls = tls(f.certs.path(), &f.ca, Some(&f.clients));
    let admin_token = "admin-token-0123456789";
    let app = TestApp::start_with(&[("fixture", &url)], |c| {
        c.server.tls = Some(tls);
        c.admin.token = Some(regcache::config::Secret::new(admin_token));
        c.auth.rule = vec![rule(&["node-admin"], &[], true)];
    })
    .await;
    let jobs = https(&app, "/api/v1/jobs");
    let admin = client(&f.ca, Some(&f.clients.client("node-admin", "x.example")));
    let nobody = client(&f.ca, None);
    let wrong = "Bearer not-the-admin-token-at-all";
    assert_eq!(get(&admin, &jobs, None).await.status(), 200);
    assert_eq!(get(&admin, &jobs, Some(wrong)).await.status(), 200);
    let stale = format!("Basic {}", base64_of("ops:old-password"));
    assert_eq!(get(&admin, &jobs, Some(&stale)).await.status(), 200);
    assert_eq!(get(&nobody, &jobs, Some(wrong)).await.status(), 401);
    assert_eq!(get(&nobody, &jobs, None).await.status(), 401);
    let token = format!("Bearer {admin_token}");
    assert_eq!(get(&nobody, &jobs, Some(&token)).await.status(), 200);
    // A certificate without admin is refused as before, header or not.
    let node = client(&f.ca, Some(&f.clients.client("node-1", "n.example")));
    assert_eq!(get(&node, &jobs, None).await.status(), 403);
    assert_eq!(get(&node, &jobs, Some(wrong)).await.status(), 403);
}

#[tokio::test]
async fn a_client_ca_without_auth_only_admits_connections() {
    let (f, url) = fixture().await;
    let tls = tls(f.certs.path(), &f.ca, Some(&f.clients));
    let app = TestApp::start_with(&[("fixture", &url)], |c| c.server.tls = Some(tls)).await;
    let manifest = https(&app, "/v2/team/secret/manifests/v1");
    let node = client(&f.ca, Some(&f.clients.client("anyone", "a.example")));
    assert_eq!(get(&node, &manifest, None).await.status(), 200);
    assert_eq!(get(&client(&f.ca, None), &manifest, None).await.status(), 200);
}

/// The CNCF registry with `tls/app:v1`, and regcache over TLS in front of it (upstream
/// `cncf`) with `tweak`ed `[auth]`.
async fn registry_and_app(
    ca: &Ca,
    clients: Option<&Ca>,
    certs: &Path,
    tweak: impl FnOnce(&mut Config),
) -> (DockerRegistry, TestApp, Image) {
    let registry = DockerRegistry::start().await;
    let work = tempfile::tempdir().unwrap();
    let image = Image::new("auth-tls-e2e", &[250_000, 30_000], "2024-06-01T00:00:00Z");
    push_image(&registry, work.path(), "tls/app", &image).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = config_for(&[("cncf", &registry.url())], dir.path());
    config.server.tls = Some(tls(certs, ca, clients));
    tweak(&mut config);
    let app = TestApp::start_config(config, Some(dir)).await;
    (registry, app, image)
}

fn digests(image: &Image) -> Vec<&str> {
    std::iter::once(image.manifest.digest.as_str())
        .chain(image.blobs().map(|b| b.digest.as_str()))
        .collect()
}

#[tokio::test]
async fn skopeo_over_tls_with_its_cert_dir_and_credentials_or_a_client_certificate() {
    let ca = Ca::new("server ca");
    let clients = Ca::new("clients ca");
    let certs = tempfile::tempdir().unwrap();
    let files = IdentityFiles::new(&[("alice", "alice-pw")], &[]);
    let (_registry, app, image) = registry_and_app(&ca, Some(&clients), certs.path(), |c| {
        c.auth.htpasswd_file = Some(files.htpasswd.clone());
        c.auth.rule = vec![rule(&["alice", "node-1"], &["cncf/tls/*"], false)];
    })
    .await;
    let src = format!("docker://{}/tls/app:v1", app.server().addr());
    let work = tempfile::tempdir().unwrap();
    // The cert dir holds the CA only: skopeo trusts regcache and logs in with a password.
    let ca_dir = work.path().join("ca-only");
    std::fs::create_dir_all(&ca_dir).unwrap();
    std::fs::write(ca_dir.join("ca.crt"), &ca.pem).unwrap();
    let ca_dir = ca_dir.display().to_string();
    let copy = |cert_dir: String, out: &'static str, creds: Option<&'static str>| {
        let (src, dst) = (src.clone(), format!("oci:{}:v1", work.path().join(out).display()));
        async move {
            let mut args = vec![
                "--insecure-policy",
                "copy",
                "--preserve-digests",
                "--src-cert-dir",
                &cert_dir,
            ];
            if let Some(c) = creds {
                args.extend(["--src-creds", c]);
            }
            args.extend([src.as_str(), dst.as_str()]);
            skopeo(&args).await
        }
    };
    copy(ca_dir.clone(), "with-creds", Some("alice:alice-pw"))
        .await
        .unwrap_or_else(|e| panic!("skopeo over TLS with --src-creds: {e}"));
    assert_layout_has(&work.path().join("with-creds"), &digests(&image));
    let e = copy(ca_dir.clone(), "anonymous", None).await.unwrap_err();
    assert!(
        e.contains("401") || e.to_lowercase().contains("unauthorized"),
        "{e}"
    );
    // A client certificate in the cert dir (<name>.cert + <name>.key) is an identity.
    let cert_dir = work.path().join("with-cert");
    std::fs::create_dir_all(&cert_dir).unwrap();
    std::fs::write(cert_dir.join("ca.crt"), &ca.pem).unwrap();
    let node = clients.client("node-1", "node-1.example");
    std::fs::write(cert_dir.join("client.cert"), &node.cert_pem).unwrap();
    std::fs::write(cert_dir.join("client.key"), &node.key_pem).unwrap();
    copy(cert_dir.display().to_string(), "by-cert", None)
        .await
        .unwrap_or_else(|e| panic!("skopeo over TLS with a client certificate: {e}"));
    assert_layout_has(&work.path().join("by-cert"), &digests(&image));
}

/// `hosts.toml` for regcache over TLS as the mirror of `registry`, trusting `ca` (written
/// into `dir`), with `extra` lines in the mirror's table.
fn hosts_toml(dir: &Path, registry: &DockerRegistry, app: &TestApp, ca: &Ca, extra: &str) {
    let ca_path = dir.join("regcache-ca.crt");
    std::fs::write(&ca_path, &ca.pem).unwrap();
    let mirror = format!("https://{}", app.server().addr());
    let lines = format!("  ca = \"{}\"\n{extra}", ca_path.display());
    write_hosts_toml_with(dir, &registry.host_port(), &registry.url(), &mirror, &lines);
}

/// Fetches `tls/app:v1` and says whether every request went to regcache (none fell back
/// to the registry itself).
async fn fetch_through_regcache(
    containerd: &Containerd,
    hosts: &Path,
    registry: &DockerRegistry,
    app: &TestApp,
) -> bool {
    let reference = format!("{}/tls/app:v1", registry.host_port());
    let fetched = containerd.fetch(hosts, &reference, &[]).await;
    assert!(!fetched.requests.is_empty(), "{}", fetched.stderr);
    let mirror = format!("https://{}/v2/", app.server().addr());
    fetched.requests.iter().all(|u| u.starts_with(&mirror))
}

#[tokio::test]
async fn containerd_over_tls_with_ca_and_a_header_token_or_a_client_certificate_identity() {
    let ca = Ca::new("server ca");
    let clients = Ca::new("clients ca");
    let certs = tempfile::tempdir().unwrap();
    let files = IdentityFiles::new(&[], &[("ci", TOKEN)]);
    let (registry, app, image) = registry_and_app(&ca, Some(&clients), certs.path(), |c| {
        c.auth.token_files = vec![files.tokens.clone()];
        c.auth.rule = vec![rule(&["ci", "node-1"], &["cncf/tls/*"], false)];
    })
    .await;
    let mirror = format!("https://{}", app.server().addr());

    // `ca` and a bearer token in a header.
    let hosts = tempfile::tempdir().unwrap();
    let header = format!("  [host.\"{mirror}\".header]\n    Authorization = \"Bearer {TOKEN}\"\n");
    hosts_toml(hosts.path(), &registry, &app, &ca, &header);
    let containerd = Containerd::start().await;
    assert!(fetch_through_regcache(&containerd, hosts.path(), &registry, &app).await);
    let mut expected: Vec<String> = digests(&image).into_iter().map(str::to_owned).collect();
    expected.sort_unstable();
    assert_eq!(containerd.content_digests().await, expected);
    drop(containerd);

    // `ca` and a client certificate whose CN is an identity with a rule.
    let write_client = |issued: &Issued, name: &str| {
        let (cert, key) = issued.write(certs.path(), name);
        format!("  client = [[\"{}\", \"{}\"]]\n", cert.display(), key.display())
    };
    let node1 = write_client(&clients.client("node-1", "node-1.example"), "node-1");
    let hosts = tempfile::tempdir().unwrap();
    hosts_toml(hosts.path(), &registry, &app, &ca, &node1);
    let containerd = Containerd::start().await;
    assert!(fetch_through_regcache(&containerd, hosts.path(), &registry, &app).await);
    assert_eq!(containerd.content_digests().await, expected);
    drop(containerd);

    // A certificate naming an identity without a rule is refused by regcache; containerd
    // then falls back to the registry itself.
    let node9 = write_client(&clients.client("node-9", "node-9.example"), "node-9");
    let hosts = tempfile::tempdir().unwrap();
    hosts_toml(hosts.path(), &registry, &app, &ca, &node9);
    let containerd = Containerd::start().await;
    assert!(
        !fetch_through_regcache(&containerd, hosts.path(), &registry, &app).await,
        "node-9 was refused by regcache"
    );
}
