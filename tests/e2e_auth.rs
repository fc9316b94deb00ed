//! `[auth]` end to end with real parts: the CNCF registry (`docker-registry`) as the
//! upstream, seeded by skopeo; skopeo pulling through regcache with `--src-creds`, with a
//! login stored by `skopeo login` (the Docker-style `GET /v2/` flow of containers/image,
//! which Podman shares), and without; containerd (`ctr`) through a `hosts.toml` whose
//! `header` carries a bearer token; and the htpasswd file replaced while clients pull.

mod common;

use common::app::{config_for, TestApp};
use common::containerd::{write_hosts_toml_with, Containerd};
use common::external::{push_image, skopeo, skopeo_copy, DockerRegistry};
use common::images::{assert_layout_has, sha256_digest, Image};
use common::logins::IdentityFiles;
use common::wait_until_async;
use futures::StreamExt;
use regcache::config::{AuthRule, Config};
use std::path::Path;
use std::time::Duration;

const TOKEN: &str = "ci-runner-token-0123456789";

fn rule(identities: &[&str], pull: &[&str]) -> AuthRule {
    AuthRule {
        identities: identities.iter().map(|s| (*s).to_owned()).collect(),
        pull: pull.iter().map(|s| (*s).to_owned()).collect(),
        ..AuthRule::default()
    }
}

/// regcache in front of `registry` (upstream `cncf`, the default) with `files` as its
/// identity sources: alice, carol and the `ci` token may pull `cncf/test/app*`; nothing
/// else, and nothing anonymously.
async fn start(registry: &DockerRegistry, files: &IdentityFiles, tweak: impl FnOnce(&mut Config)) -> TestApp {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config_for(&[("cncf", &registry.url())], dir.path());
    config.auth.htpasswd_file = Some(files.htpasswd.clone());
    config.auth.token_files = vec![files.tokens.clone()];
    config.auth.rule = vec![rule(&["alice", "carol", "ci"], &["cncf/test/app*"])];
    tweak(&mut config);
    TestApp::start_config(config, Some(dir)).await
}

fn host(app: &TestApp) -> String {
    app.base.trim_start_matches("http://").to_owned()
}

/// Checks the layout skopeo wrote holds the image, every blob hashing to its digest.
fn assert_pulled(out: &Path, image: &Image) {
    let digests: Vec<&str> = std::iter::once(image.manifest.digest.as_str())
        .chain(image.blobs().map(|b| b.digest.as_str()))
        .collect();
    assert_layout_has(out, &digests);
}

#[tokio::test]
async fn skopeo_pulls_with_src_creds_and_is_refused_without_or_outside_its_rules() {
    let registry = DockerRegistry::start().await;
    let work = tempfile::tempdir().unwrap();
    let image = Image::new("auth-e2e", &[300_000, 40_000], "2024-06-01T00:00:00Z");
    push_image(&registry, work.path(), "test/app", &image).await;
    push_image(&registry, work.path(), "test/secret", &image).await;
    let files = IdentityFiles::new(&[("alice", "alice-pw")], &[]);
    let app = start(&registry, &files, |_| {}).await;
    let src = format!("docker://{}/test/app:v1", host(&app));

    let out = work.path().join("pulled");
    skopeo_copy(
        &src,
        &format!("oci:{}:v1", out.display()),
        &["--src-creds", "alice:alice-pw"],
    )
    .await
    .unwrap_or_else(|e| panic!("skopeo with --src-creds: {e}"));
    assert_pulled(&out, &image);
    // `--creds` on `skopeo inspect` reads the manifest the same way.
    let inspected = skopeo(&["inspect", "--tls-verify=false", "--creds", "alice:alice-pw", &src])
        .await
        .unwrap_or_else(|e| panic!("skopeo inspect --creds: {e}"));
    assert!(String::from_utf8_lossy(&inspected.stdout).contains(&image.manifest.digest));

    let dst = |name: &str| format!("oci:{}:v1", work.path().join(name).display());
    let e = skopeo_copy(&src, &dst("anon"), &[]).await.unwrap_err();
    assert!(
        e.contains("401") || e.to_lowercase().contains("unauthorized"),
        "{e}"
    );
    let e = skopeo_copy(&src, &dst("wrong"), &["--src-creds", "alice:nope"])
        .await
        .unwrap_err();
    assert!(
        e.contains("401") || e.to_lowercase().contains("unauthorized"),
        "{e}"
    );
    let secret = format!("docker://{}/test/secret:v1", host(&app));
    let e = skopeo_copy(&secret, &dst("secret"), &["--src-creds", "alice:alice-pw"])
        .await
        .unwrap_err();
    assert!(e.to_lowercase().contains("denied"), "{e}");
    // regcache never asked the registry for the secret repository.
    let asked = registry
        .log()
        .lines()
        .filter(|l| l.contains("/v2/test/secret/") && l.contains("regcache/"))
        .count();
    assert_eq!(asked, 0, "{}", registry.log());
}

#[tokio::test]
async fn skopeo_login_stores_a_login_that_later_pulls_use() {
    let registry = DockerRegistry::start().await;
    let work = tempfile::tempdir().unwrap();
    let image = Image::new("auth-login", &[100_000], "2024-06-01T00:00:00Z");
    push_image(&registry, work.path(), "test/app", &image).await;
    let files = IdentityFiles::new(&[("alice", "alice-pw")], &[]);
    let app = start(&registry, &files, |_| {}).await;
    let authfile = work.path().join("auth.json");
    let authfile = authfile.to_str().unwrap();
    let login = |password: &'static str| {
        let host = host(&app);
        async move {
            skopeo(&[
                "login",
                "--tls-verify=false",
                "--authfile",
                authfile,
                "--username",
                "alice",
                "--password",
                password,
                &host,
            ])
            .await
        }
    };
    // containers/image reports the 401 to its login as a bad username or password.
    let e = login("wrong").await.unwrap_err();
    assert!(e.contains("invalid username/password"), "{e}");
    assert!(
        !Path::new(authfile).exists() || !std::fs::read_to_string(authfile).unwrap().contains(&host(&app))
    );
    login("alice-pw")
        .await
        .unwrap_or_else(|e| panic!("skopeo login: {e}"));
    let out = work.path().join("pulled");
    skopeo_copy(
        &format!("docker://{}/test/app:v1", host(&app)),
        &format!("oci:{}:v1", out.display()),
        &["--authfile", authfile],
    )
    .await
    .unwrap_or_else(|e| panic!("skopeo with the stored login: {e}"));
    assert_pulled(&out, &image);
}

#[tokio::test]
async fn containerd_pulls_with_a_bearer_token_from_hosts_toml_headers() {
    let registry = DockerRegistry::start().await;
    let work = tempfile::tempdir().unwrap();
    let image = Image::new("auth-ctr", &[200_000, 30_000], "2024-06-01T00:00:00Z");
    push_image(&registry, work.path(), "test/app", &image).await;
    let files = IdentityFiles::new(&[], &[("ci", TOKEN)]);
    let app = start(&registry, &files, |_| {}).await;
    let reference = format!("{}/test/app:v1", registry.host_port());
    let containerd = Containerd::start().await;

    // Without the header regcache asks for a login; containerd, holding none, falls back
    // to `server`, the registry itself.
    let plain = tempfile::tempdir().unwrap();
    write_hosts_toml_with(
        plain.path(),
        &registry.host_port(),
        &registry.url(),
        &app.base,
        "",
    );
    containerd.fetch(plain.path(), &reference, &[]).await;
    let direct = direct_containerd_requests(&registry);
    assert!(
        !direct.is_empty(),
        "regcache refused, so containerd went to the registry"
    );

    // With the header every request goes to regcache, which lets the `ci` token in.
    let containerd = {
        drop(containerd);
        Containerd::start().await
    };
    let before = direct_containerd_requests(&registry).len();
    let hosts = tempfile::tempdir().unwrap();
    let header = format!(
        "  [host.\"{}\".header]\n    Authorization = \"Bearer {TOKEN}\"\n",
        app.base
    );
    write_hosts_toml_with(
        hosts.path(),
        &registry.host_port(),
        &registry.url(),
        &app.base,
        &header,
    );
    let fetched = containerd.fetch(hosts.path(), &reference, &[]).await;
    assert!(!fetched.requests.is_empty(), "{}", fetched.stderr);
    for url in &fetched.requests {
        assert!(
            url.starts_with(&app.base),
            "containerd asked {url}:\n{}",
            fetched.stderr
        );
    }
    assert_eq!(
        direct_containerd_requests(&registry).len(),
        before,
        "containerd did not fall back to the registry"
    );
    let mut expected: Vec<String> = std::iter::once(image.manifest.digest.clone())
        .chain(image.blobs().map(|b| b.digest.clone()))
        .collect();
    expected.sort_unstable();
    assert_eq!(containerd.content_digests().await, expected);
}

/// Registry access-log lines of requests containerd sent to it directly.
fn direct_containerd_requests(registry: &DockerRegistry) -> Vec<String> {
    registry
        .log()
        .lines()
        .filter(|l| l.contains("containerd/"))
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn the_htpasswd_file_replaced_while_clients_pull_finishes_the_pulls_and_then_rules() {
    let registry = DockerRegistry::start().await;
    let work = tempfile::tempdir().unwrap();
    // Big enough that both transfers are under way when the file changes.
    let image = Image::new("auth-reload", &[48 * 1024 * 1024], "2024-06-01T00:00:00Z");
    push_image(&registry, work.path(), "test/app", &image).await;
    let files = IdentityFiles::new(&[("alice", "alice-pw"), ("olduser", "old-pw")], &[]);
    let app = start(&registry, &files, |c| {
        c.auth.rule = vec![rule(&["alice", "olduser", "newuser"], &["cncf/test/app"])];
    })
    .await;
    let access = app.server().access().clone();
    let layer = &image.layers[0];

    // olduser starts downloading the layer and holds the response open after 1 MiB.
    let resp = app
        .client
        .get(app.url(&format!("/v2/test/app/blobs/{}", layer.digest)))
        .basic_auth("olduser", Some("old-pw"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let mut got = Vec::with_capacity(layer.len());
    while got.len() < 1024 * 1024 {
        got.extend_from_slice(&body.next().await.expect("more of the layer").unwrap());
    }
    // alice pulls the whole image with skopeo meanwhile.
    let out = work.path().join("pulled");
    let src = format!("docker://{}/test/app:v1", host(&app));
    let dst = format!("oci:{}:v1", out.display());
    let pull = tokio::spawn(async move { skopeo_copy(&src, &dst, &["--src-creds", "alice:alice-pw"]).await });

    // The operator replaces the file: alice stays (a fresh hash of the same password),
    // olduser goes, newuser comes.
    files.set_users(&[("alice", "alice-pw"), ("newuser", "new-pw")]);
    wait_until_async("the new file is read", Duration::from_secs(10), || async {
        access.generation() == 1
    })
    .await;

    // The next requests use the new file.
    let v2 = |user: &'static str, password: &'static str| {
        app.client
            .get(app.url("/v2/"))
            .basic_auth(user, Some(password))
            .send()
    };
    assert_eq!(v2("newuser", "new-pw").await.unwrap().status(), 200);
    assert_eq!(v2("olduser", "old-pw").await.unwrap().status(), 401);
    // The transfers already under way complete.
    while let Some(chunk) = body.next().await {
        got.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(got.len(), layer.len());
    assert_eq!(
        sha256_digest(&got),
        layer.digest,
        "olduser's download completed intact"
    );
    pull.await
        .unwrap()
        .unwrap_or_else(|e| panic!("alice's pull across the change: {e}"));
    assert_pulled(&out, &image);
}
