//! What `[auth]` says and never says: one start-up warning when anonymous clients on other
//! machines can pull through an upstream's credentials (and none otherwise), no password
//! or token in any log line, and `check-config` printing the auth section without the
//! identity files' contents while refusing a non-bcrypt htpasswd file by line.
//! Every test here installs the log capture first (`logs::capture`).

mod common;

use common::app::{config_for, TestApp};
use common::binary::{run, write};
use common::fixture_upstream::{FixtureOptions, FixtureUpstream};
use common::images::Image;
use common::logins::{htpasswd_line, IdentityFiles};
use common::logs;
use regcache::config::{AuthRule, ClientAuth, Config, Secret, TlsConfig};
use std::time::Duration;

const WARNING: &str = "anonymous clients on other machines can pull through upstreams that have credentials";

/// Starts regcache listening on `listen` with one upstream `name` that has credentials,
/// `tweak`ed; returns the warnings that name `name`.
async fn startup_warnings(
    name: &str,
    listen: &str,
    tweak: impl FnOnce(&mut Config),
) -> Vec<serde_json::Value> {
    logs::capture();
    let dir = tempfile::tempdir().unwrap();
    let mut config = config_for(&[(name, "http://127.0.0.1:9")], dir.path());
    config.server.listen = listen.into();
    config.upstream[0].username = Some("robot".into());
    config.upstream[0].password = Some(Secret::new("upstream-password"));
    tweak(&mut config);
    let mut app = TestApp::start_config(config, Some(dir)).await;
    app.stop().await;
    logs::lines_with(WARNING)
        .into_iter()
        .filter(|l| l["fields"]["upstreams"].as_str() == Some(name))
        .collect()
}

fn anonymous(pull: &str) -> AuthRule {
    AuthRule {
        anonymous: true,
        pull: vec![pull.into()],
        ..AuthRule::default()
    }
}

#[tokio::test]
async fn one_warning_when_anonymous_clients_elsewhere_can_use_upstream_credentials() {
    // Every address, no [auth]: anyone on the network pulls with the upstream's account.
    let warned = startup_warnings("exposed-open", "0.0.0.0:0", |_| {}).await;
    assert_eq!(warned.len(), 1, "{warned:#?}");
    let line = &warned[0];
    assert_eq!(line["level"], "WARN");
    let message = line["fields"]["message"].as_str().unwrap();
    for fix in ["[auth]", "htpasswd_file", "127.0.0.1"] {
        assert!(
            message.contains(fix),
            "the warning says how to fix it ({fix}): {message}"
        );
    }
    assert!(!line.to_string().contains("upstream-password"));
    // An anonymous rule that reaches into the upstream is the same exposure.
    let files = IdentityFiles::new(&[("alice", "pw")], &[]);
    let warned = startup_warnings("exposed-rule", "0.0.0.0:0", |c| {
        c.auth.htpasswd_file = Some(files.htpasswd.clone());
        c.auth.rule = vec![anonymous("exposed-rule/library/*")];
    })
    .await;
    assert_eq!(warned.len(), 1, "{warned:#?}");
}

#[tokio::test]
async fn no_warning_on_loopback_or_when_anonymous_pulls_stay_off_that_upstream() {
    assert!(startup_warnings("quiet-loopback", "127.0.0.1:0", |_| {})
        .await
        .is_empty());
    let files = IdentityFiles::new(&[("alice", "pw")], &[]);
    // Logins configured and no anonymous rule: anonymous pulls are off.
    let warned = startup_warnings("quiet-auth", "0.0.0.0:0", |c| {
        c.auth.htpasswd_file = Some(files.htpasswd.clone());
    })
    .await;
    assert!(warned.is_empty(), "{warned:#?}");
    // Anonymous pulls allowed, but only from another upstream.
    let warned = startup_warnings("quiet-other", "0.0.0.0:0", |c| {
        c.auth.htpasswd_file = Some(files.htpasswd.clone());
        c.auth.rule = vec![anonymous("docker.io/**")];
    })
    .await;
    assert!(warned.is_empty(), "{warned:#?}");
    // Required client certificates keep out whoever holds none; optional ones do not.
    let ca = common::tls::Ca::new("server ca");
    let certs = tempfile::tempdir().unwrap();
    let (cert_file, key_file) = ca.server("regcache").write(certs.path(), "server");
    let client_ca_file = certs.path().join("clients.crt");
    std::fs::write(&client_ca_file, &ca.pem).unwrap();
    let tls = |client_auth| TlsConfig {
        cert_file: cert_file.clone(),
        key_file: key_file.clone(),
        client_ca_file: Some(client_ca_file.clone()),
        client_auth,
    };
    let warned = startup_warnings("quiet-certs", "0.0.0.0:0", |c| c.server.tls = Some(tls(None))).await;
    assert!(warned.is_empty(), "{warned:#?}");
    let warned = startup_warnings("exposed-optional", "0.0.0.0:0", |c| {
        c.server.tls = Some(tls(Some(ClientAuth::Optional)));
    })
    .await;
    assert_eq!(warned.len(), 1, "{warned:#?}");
}

#[tokio::test]
async fn passwords_and_tokens_never_reach_the_log() {
    logs::capture();
    const PASSWORD: &str = "hunter2-correct-horse";
    const WRONG: &str = "hunter3-wrong-horse";
    const TOKEN: &str = "tok-0123456789-secret";
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    upstream.add_image(
        "team/app",
        Some("v1"),
        &Image::new("logs", &[1000], "2024-05-06T07:08:09Z"),
    );
    let files = IdentityFiles::new(&[("log-alice", PASSWORD)], &[("log-ci", TOKEN)]);
    let app = TestApp::start_with(&[("fixture", &upstream.url())], |c| {
        c.auth.htpasswd_file = Some(files.htpasswd.clone());
        c.auth.token_files = vec![files.tokens.clone()];
        c.auth.rule = vec![AuthRule {
            identities: vec!["log-alice".into(), "log-ci".into()],
            pull: vec!["**".into()],
            ..AuthRule::default()
        }];
    })
    .await;
    let get = |user: &str, password: &str| {
        app.client
            .get(app.url("/v2/team/app/manifests/v1"))
            .basic_auth(user, Some(password))
            .send()
    };
    assert_eq!(get("log-alice", PASSWORD).await.unwrap().status(), 200);
    assert_eq!(get("log-alice", WRONG).await.unwrap().status(), 401);
    assert_eq!(get(WRONG, WRONG).await.unwrap().status(), 401);
    let bearer = |t: &str| {
        app.client
            .get(app.url("/v2/team/app/manifests/v1"))
            .bearer_auth(t)
            .send()
    };
    assert_eq!(bearer(TOKEN).await.unwrap().status(), 200);
    assert_eq!(bearer("tok-0123456789-wrong!").await.unwrap().status(), 401);
    // The failures were logged (with the user name, to help the operator)...
    common::wait_until("the failed logins are logged", Duration::from_secs(5), || {
        logs::lines_with("login failed").len() >= 3
    });
    // ...with the client's address, which failed logins are slowed by...
    let failed = logs::lines_with("\"auth.user\":\"log-alice\"");
    assert!(
        failed.iter().any(|l| l["fields"]["client.addr"] == "127.0.0.1"),
        "{failed:#?}"
    );
    // ...and no line anywhere holds a password or token, good or bad.
    for secret in [PASSWORD, TOKEN, "tok-0123456789-wrong!"] {
        let leaked = logs::lines_with(secret);
        assert!(leaked.is_empty(), "{secret} logged: {leaked:#?}");
    }
    // A wrong password sent as a user name is the client's doing; only its own field
    // carries it, never the password field.
    assert_eq!(logs::lines_with(&format!("\"auth.user\":\"{WRONG}\"")).len(), 1);
}

#[test]
fn check_config_prints_the_auth_section_but_no_identity_file_content() {
    let dir = tempfile::tempdir().unwrap();
    let hash_line = htpasswd_line("alice", "alice-password", 5);
    let htpasswd = write(dir.path(), "htpasswd", &format!("{hash_line}\n"));
    let tokens = write(dir.path(), "tokens", "ci:ci-token-0123456789abcdef\n");
    let config = write(
        dir.path(),
        "regcache.toml",
        &format!(
            "[auth]\nhtpasswd_file = {htpasswd:?}\ntoken_files = [{tokens:?}]\n\
             [auth.groups]\nops = [\"alice\"]\n\
             [[auth.rule]]\ngroups = [\"ops\"]\npull = [\"docker.io/**\"]\nadmin = true\n"
        ),
    );
    let out = run(
        &["check-config", "--config", &config],
        &[],
        dir.path(),
        Duration::from_secs(30),
    )
    .ok();
    let printed = out.config();
    assert_eq!(printed["auth"]["htpasswd_file"].as_str(), Some(htpasswd.as_str()));
    assert_eq!(printed["auth"]["rule"][0]["admin"].as_bool(), Some(true));
    let hash = hash_line.split_once(':').unwrap().1;
    for secret in [hash, "ci-token-0123456789abcdef", "alice-password"] {
        assert!(
            !out.stdout.contains(secret) && !out.stderr.contains(secret),
            "{secret}: {out:#?}"
        );
    }

    // A non-bcrypt line is refused by check-config, naming the key, the file and the line.
    std::fs::write(
        &htpasswd,
        format!("{hash_line}\nbob:$apr1$r31.....$HqJZimcKQFAMYayBlzkrA/\n"),
    )
    .unwrap();
    let out = run(
        &["check-config", "--config", &config],
        &[],
        dir.path(),
        Duration::from_secs(30),
    );
    out.assert_failure_naming(&["auth.htpasswd_file", &htpasswd, "line 2", "MD5", "htpasswd -B"]);
    assert!(!out.stderr.contains("HqJZimcKQFAMYayBlzkrA"), "{out:#?}");
    // So is a short token, without echoing it.
    std::fs::write(&htpasswd, format!("{hash_line}\n")).unwrap();
    std::fs::write(&tokens, "ci:short-token\n").unwrap();
    let out = run(
        &["check-config", "--config", &config],
        &[],
        dir.path(),
        Duration::from_secs(30),
    );
    out.assert_failure_naming(&["auth.token_files[0]", "line 1", "16 characters"]);
    assert!(!out.stderr.contains("short-token"), "{out:#?}");
}
