//! Who may pull what (`[auth]`), through HTTP against the in-process fixture upstream:
//! 401 with a Basic challenge when nothing or a wrong login is sent, 403 `DENIED` outside
//! the rules (decided before any upstream request), Docker's `GET /v2/` login flow,
//! anonymous rules, bearer tokens, one route judged like another, one bcrypt check per
//! credential, identity files reloaded on change, failed logins slowed, and the admin API
//! for identities with `admin`.

mod common;

use common::app::{error_code, TestApp};
use common::fixture_upstream::{FixtureOptions, FixtureUpstream};
use common::images::{Image, ACCEPT_ALL_MANIFESTS};
use common::logins::{replace_file, rule, IdentityFiles};
use common::wait_until_async;
use regcache::config::{AuthRule, Config};
use reqwest::header::{ACCEPT, AUTHORIZATION, WWW_AUTHENTICATE};
use reqwest::Method;
use std::time::{Duration, Instant};

const CI_TOKEN: &str = "ci-token-0123456789abcdef";

fn anonymous(pull: &[&str]) -> AuthRule {
    AuthRule {
        anonymous: true,
        pull: pull.iter().map(|s| (*s).to_owned()).collect(),
        ..AuthRule::default()
    }
}

/// alice may pull `fixture/team/**` and use the admin API; bob may pull `fixture/team/app`
/// only; the `ci` token identity may pull everything; anonymous clients get
/// `fixture/public/*`.
fn with_rules(files: &IdentityFiles) -> impl FnOnce(&mut Config) + '_ {
    move |c: &mut Config| {
        c.auth.htpasswd_file = Some(files.htpasswd.clone());
        c.auth.token_files = vec![files.tokens.clone()];
        c.auth.rule = vec![
            rule(&["alice"], &["fixture/team/**"], true),
            rule(&["bob"], &["fixture/team/app"], false),
            rule(&["ci"], &["**"], false),
            anonymous(&["fixture/public/*"]),
        ];
    }
}

struct Setup {
    upstream: FixtureUpstream,
    app: TestApp,
    files: IdentityFiles,
    image: Image,
}

async fn setup() -> Setup {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let image = Image::new("auth", &[1000, 20_000], "2024-05-06T07:08:09Z");
    for repo in ["team/app", "team/secret", "public/tool", "other/app"] {
        upstream.add_image(repo, Some("v1"), &image);
    }
    let files = IdentityFiles::new(&[("alice", "alice-pw"), ("bob", "bob-pw")], &[("ci", CI_TOKEN)]);
    let app = TestApp::start_with(&[("fixture", &upstream.url())], with_rules(&files)).await;
    Setup {
        upstream,
        app,
        files,
        image,
    }
}

/// GET `path` with an Accept list and, if given, `authorization`.
async fn get(app: &TestApp, path: &str, authorization: Option<&str>) -> reqwest::Response {
    let mut req = app.client.get(app.url(path)).header(ACCEPT, ACCEPT_ALL_MANIFESTS);
    if let Some(a) = authorization {
        req = req.header(AUTHORIZATION, a);
    }
    req.send().await.expect("request to regcache")
}

fn basic(user: &str, password: &str) -> String {
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

fn challenge(resp: &reqwest::Response) -> String {
    resp.headers()
        .get(WWW_AUTHENTICATE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_else(|| panic!("no WWW-Authenticate on {}: {resp:?}", resp.status()))
        .to_owned()
}

/// 401 `UNAUTHORIZED` with the Basic challenge every client understands.
async fn assert_401(resp: reqwest::Response) {
    assert_eq!(challenge(&resp), "Basic realm=\"regcache\"");
    assert_eq!(error_code(resp).await, (401, "UNAUTHORIZED".to_owned()));
}

const MANIFEST: &str = "/v2/team/app/manifests/v1";

#[tokio::test]
async fn nothing_sent_is_401_with_a_basic_challenge_and_asks_no_upstream() {
    let s = setup().await;
    assert_401(get(&s.app, MANIFEST, None).await).await;
    let head = s.app.client.head(s.app.url(MANIFEST)).send().await.unwrap();
    assert_eq!(head.status(), 401);
    assert_eq!(challenge(&head), "Basic realm=\"regcache\"");
    let blob = &s.image.layers[0].digest;
    assert_401(get(&s.app, &format!("/v2/team/app/blobs/{blob}"), None).await).await;
    assert_401(get(&s.app, "/v2/team/app/tags/list", None).await).await;
    assert!(
        s.upstream.log().is_empty(),
        "refused before the upstream: {:?}",
        s.upstream.log()
    );
    // /healthz stays open for probes.
    assert_eq!(s.app.get("/healthz").await.status(), 200);
}

#[tokio::test]
async fn a_wrong_password_an_unknown_user_or_token_and_garbage_are_401() {
    let s = setup().await;
    for auth in [
        basic("alice", "wrong"),
        basic("mallory", "alice-pw"),
        basic("alice", ""),
        "Bearer not-a-token-0123456789".to_owned(),
        "Basic !!!".to_owned(),
        "Negotiate abc".to_owned(),
    ] {
        assert_401(get(&s.app, MANIFEST, Some(&auth)).await).await;
    }
    assert!(s.upstream.log().is_empty(), "{:?}", s.upstream.log());
    // The right password gets the image.
    let resp = get(&s.app, MANIFEST, Some(&basic("alice", "alice-pw"))).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.bytes().await.unwrap(), s.image.manifest.bytes);
}

#[tokio::test]
async fn a_repository_outside_the_rules_is_403_denied_before_any_upstream_request() {
    let s = setup().await;
    let bob = basic("bob", "bob-pw");
    assert_eq!(get(&s.app, MANIFEST, Some(&bob)).await.status(), 200);
    s.upstream.reset_log();
    for path in [
        "/v2/team/secret/manifests/v1",
        "/v2/other/app/manifests/v1",
        "/v2/team/secret/tags/list",
        &format!("/v2/team/secret/blobs/{}", s.image.layers[0].digest),
        // A name that does not exist is refused the same way: no probing.
        "/v2/team/nothing-here/manifests/v1",
    ] {
        let resp = get(&s.app, path, Some(&bob)).await;
        assert!(
            resp.headers().get(WWW_AUTHENTICATE).is_none(),
            "{path}: a 403 has no challenge"
        );
        assert_eq!(error_code(resp).await, (403, "DENIED".to_owned()), "{path}");
    }
    assert!(s.upstream.log().is_empty(), "{:?}", s.upstream.log());
    // A cached blob of team/app is not served under team/secret to bob either.
    let blob = &s.image.layers[0].digest;
    assert_eq!(
        get(&s.app, &format!("/v2/team/app/blobs/{blob}"), Some(&bob))
            .await
            .status(),
        200
    );
    let resp = get(&s.app, &format!("/v2/team/secret/blobs/{blob}"), Some(&bob)).await;
    assert_eq!(error_code(resp).await.0, 403);
}

#[tokio::test]
async fn docker_login_flow_on_the_base_endpoint() {
    let s = setup().await;
    // `docker login` first asks without credentials and reads the challenge...
    let resp = get(&s.app, "/v2/", None).await;
    assert_eq!(resp.headers()["docker-distribution-api-version"], "registry/2.0");
    assert_401(resp).await;
    // ...then asks again with them.
    let resp = get(&s.app, "/v2/", Some(&basic("alice", "alice-pw"))).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["docker-distribution-api-version"], "registry/2.0");
    assert_eq!(resp.text().await.unwrap(), "{}");
    // A wrong password fails the login.
    assert_401(get(&s.app, "/v2/", Some(&basic("alice", "nope"))).await).await;
    // Any valid identity may log in, whatever its rules; a token too.
    assert_eq!(
        get(&s.app, "/v2/", Some(&basic("bob", "bob-pw"))).await.status(),
        200
    );
    assert_eq!(
        get(&s.app, "/v2/", Some(&format!("Bearer {CI_TOKEN}")))
            .await
            .status(),
        200
    );
    // containers/image (skopeo, Podman) without a login answers the challenge with an
    // empty Basic login: that is anonymous.
    assert_401(get(&s.app, "/v2/", Some(&basic("", ""))).await).await;
}

#[tokio::test]
async fn anonymous_rules_open_only_what_they_name() {
    let s = setup().await;
    let resp = get(&s.app, "/v2/public/tool/manifests/v1", None).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.bytes().await.unwrap(), s.image.manifest.bytes);
    // The empty login of containers/image is anonymous too.
    assert_eq!(
        get(&s.app, "/v2/public/tool/manifests/v1", Some(&basic("", "")))
            .await
            .status(),
        200
    );
    // Anything else asks for a login (401, not 403: the client may log in).
    assert_401(get(&s.app, "/v2/public/tool/sub/manifests/v1", None).await).await;
    assert_401(get(&s.app, MANIFEST, None).await).await;
    // A logged-in identity does not get the anonymous grant: bob's rules say team/app only.
    let resp = get(
        &s.app,
        "/v2/public/tool/manifests/v1",
        Some(&basic("bob", "bob-pw")),
    )
    .await;
    assert_eq!(error_code(resp).await.0, 403);
}

#[tokio::test]
async fn anonymous_rules_without_identity_sources_restrict_with_403() {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let image = Image::new("anon", &[1000], "2024-05-06T07:08:09Z");
    upstream.add_image("public/tool", Some("v1"), &image);
    upstream.add_image("private/tool", Some("v1"), &image);
    let app = TestApp::start_with(&[("fixture", &upstream.url())], |c| {
        c.auth.rule = vec![anonymous(&["fixture/public/**"])];
    })
    .await;
    assert_eq!(
        get(&app, "/v2/", None).await.status(),
        200,
        "no login exists to ask for"
    );
    assert_eq!(
        get(&app, "/v2/public/tool/manifests/v1", None).await.status(),
        200
    );
    // Stored logins that clients send anyway are ignored: nothing could check them.
    assert_eq!(
        get(&app, "/v2/public/tool/manifests/v1", Some(&basic("x", "y")))
            .await
            .status(),
        200
    );
    let resp = get(&app, "/v2/private/tool/manifests/v1", None).await;
    assert!(resp.headers().get(WWW_AUTHENTICATE).is_none());
    assert_eq!(error_code(resp).await, (403, "DENIED".to_owned()));
}

#[tokio::test]
async fn without_auth_everything_stays_open_and_logins_are_ignored() {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let image = Image::new("open", &[1000], "2024-05-06T07:08:09Z");
    upstream.add_image("team/app", Some("v1"), &image);
    let app = TestApp::start(&upstream.url()).await;
    assert_eq!(get(&app, "/v2/", None).await.status(), 200);
    assert_eq!(get(&app, MANIFEST, None).await.status(), 200);
    assert_eq!(
        get(&app, MANIFEST, Some(&basic("any", "thing"))).await.status(),
        200
    );
    assert_eq!(get(&app, MANIFEST, Some("Bearer whatever")).await.status(), 200);
}

#[tokio::test]
async fn bearer_tokens_from_files_are_identities() {
    let s = setup().await;
    let ci = format!("Bearer {CI_TOKEN}");
    for path in [
        MANIFEST,
        "/v2/other/app/manifests/v1",
        "/v2/team/secret/manifests/v1",
    ] {
        assert_eq!(get(&s.app, path, Some(&ci)).await.status(), 200, "{path}");
    }
    assert_eq!(
        s.app.server().access().password_checks(),
        0,
        "a token costs no bcrypt"
    );
}

#[tokio::test]
async fn every_route_to_a_repository_is_judged_by_upstream_name_and_repository() {
    // Two upstreams on one fixture: `fixture` (the default) and `second`.
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let image = Image::new("routes", &[1000], "2024-05-06T07:08:09Z");
    upstream.add_image("team/app", Some("v1"), &image);
    let files = IdentityFiles::new(&[("bob", "bob-pw")], &[]);
    let url = upstream.url();
    let app = TestApp::start_with(&[("fixture", &url), ("second", &url)], |c| {
        c.auth.htpasswd_file = Some(files.htpasswd.clone());
        c.auth.rule = vec![rule(&["bob"], &["second/team/*"], false)];
    })
    .await;
    let bob = basic("bob", "bob-pw");
    let host = upstream.host_port();
    // The same repository of `second`, by path prefix and by containerd's ?ns=<host>
    // (which matches `fixture` first, by host, so use ?ns=second).
    assert_eq!(
        get(&app, "/v2/second/team/app/manifests/v1", Some(&bob))
            .await
            .status(),
        200
    );
    assert_eq!(
        get(&app, "/v2/team/app/manifests/v1?ns=second", Some(&bob))
            .await
            .status(),
        200
    );
    // The same name through the default upstream, or by its host, is another repository.
    for path in [
        "/v2/team/app/manifests/v1".to_owned(),
        "/v2/fixture/team/app/manifests/v1".to_owned(),
        format!("/v2/team/app/manifests/v1?ns={host}"),
    ] {
        assert_eq!(
            error_code(get(&app, &path, Some(&bob)).await).await.0,
            403,
            "{path}"
        );
    }
}

#[tokio::test]
async fn bcrypt_runs_once_per_credential_not_per_request() {
    let s = setup().await;
    let access = s.app.server().access().clone();
    let alice = basic("alice", "alice-pw");
    // Twenty clients presenting the same new login at once share one check...
    let gets = (0..20).map(|_| get(&s.app, MANIFEST, Some(&alice)));
    for resp in futures::future::join_all(gets).await {
        assert_eq!(resp.status(), 200);
    }
    assert_eq!(access.password_checks(), 1);
    // ...and later requests, on any connection, cost none.
    for _ in 0..30 {
        assert_eq!(get(&s.app, MANIFEST, Some(&alice)).await.status(), 200);
    }
    let fresh = reqwest::Client::new();
    let resp = fresh
        .get(s.app.url(MANIFEST))
        .header(ACCEPT, ACCEPT_ALL_MANIFESTS)
        .header(AUTHORIZATION, &alice)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        access.password_checks(),
        1,
        "cached across requests and connections"
    );
    // Another login is another check; a wrong password is checked every time.
    assert_eq!(
        get(&s.app, MANIFEST, Some(&basic("bob", "bob-pw")))
            .await
            .status(),
        200
    );
    assert_eq!(access.password_checks(), 2);
    for _ in 0..2 {
        assert_eq!(
            get(&s.app, MANIFEST, Some(&basic("alice", "bad"))).await.status(),
            401
        );
    }
    assert_eq!(access.password_checks(), 4);
}

#[tokio::test]
async fn the_htpasswd_file_is_reloaded_on_change_and_a_bad_one_keeps_the_old() {
    let s = setup().await;
    let access = s.app.server().access().clone();
    let alice = basic("alice", "alice-pw");
    assert_eq!(get(&s.app, MANIFEST, Some(&alice)).await.status(), 200);
    assert_eq!(access.password_checks(), 1);
    // alice's password changes and carol arrives.
    s.files
        .set_users(&[("alice", "alice-new"), ("carol", "carol-pw")]);
    wait_until_async(
        "the new htpasswd file is read",
        Duration::from_secs(10),
        || async { access.generation() == 1 },
    )
    .await;
    assert_eq!(
        get(&s.app, "/v2/", Some(&basic("carol", "carol-pw")))
            .await
            .status(),
        200
    );
    // The cached old login is gone with the old file.
    assert_401(get(&s.app, MANIFEST, Some(&alice)).await).await;
    assert_eq!(
        get(&s.app, MANIFEST, Some(&basic("alice", "alice-new")))
            .await
            .status(),
        200
    );
    assert_401(get(&s.app, MANIFEST, Some(&basic("bob", "bob-pw"))).await).await;

    // A file with a hash regcache cannot verify is refused whole, with the token file
    // changed beside it: the last good logins stay, tokens included.
    let generation = access.generation();
    replace_file(&s.files.htpasswd, "alice:$apr1$r31.....$HqJZimcKQFAMYayBlzkrA/\n");
    s.files
        .set_tokens(&[("ci", CI_TOKEN), ("ci2", "ci2-token-0123456789abcdef")]);
    wait_until_async("the bad file was refused", Duration::from_secs(10), || async {
        access.reload_failures() >= 1
    })
    .await;
    assert_eq!(access.generation(), generation);
    assert_eq!(
        get(&s.app, MANIFEST, Some(&basic("alice", "alice-new")))
            .await
            .status(),
        200
    );
    assert_401(get(&s.app, "/v2/", Some("Bearer ci2-token-0123456789abcdef")).await).await;
    // Fixed, both files are taken.
    s.files.set_users(&[("alice", "alice-new")]);
    wait_until_async("the fixed file is read", Duration::from_secs(10), || async {
        access.generation() == generation + 1
    })
    .await;
    let ci2 = get(&s.app, "/v2/", Some("Bearer ci2-token-0123456789abcdef")).await;
    assert_eq!(ci2.status(), 200);
}

#[tokio::test]
async fn failed_logins_from_one_address_are_slowed_down() {
    let s = setup().await;
    let access = s.app.server().access().clone();
    let alice = basic("alice", "alice-pw");
    assert_eq!(get(&s.app, MANIFEST, Some(&alice)).await.status(), 200);
    let wrong = basic("alice", "guess");
    // The first failure answers at once; each one after waits longer (250 ms, 500 ms,
    // 1 s, ...): the fourth guess waits at least a second.
    let mut last = Duration::ZERO;
    for _ in 0..4 {
        let started = Instant::now();
        assert_eq!(get(&s.app, MANIFEST, Some(&wrong)).await.status(), 401);
        last = started.elapsed();
    }
    assert!(last >= Duration::from_secs(1), "the fourth guess took {last:?}");
    assert_eq!(access.password_checks(), 5);
    // A login verified before still works from that address, from the cache: no bcrypt
    // (and so no wait for the throttle, which only guards bcrypt checks).
    assert_eq!(get(&s.app, MANIFEST, Some(&alice)).await.status(), 200);
    assert_eq!(access.password_checks(), 5);
}

#[tokio::test]
async fn the_admin_api_takes_identities_with_admin_and_the_token() {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let files = IdentityFiles::new(&[("alice", "alice-pw"), ("bob", "bob-pw")], &[("ops", CI_TOKEN)]);
    let token = "admin-token-0123456789";
    let app = TestApp::start_with(&[("fixture", &upstream.url())], |c| {
        c.auth.htpasswd_file = Some(files.htpasswd.clone());
        c.auth.token_files = vec![files.tokens.clone()];
        c.auth.rule = vec![rule(&["alice", "ops"], &[], true), rule(&["bob"], &["**"], false)];
        c.admin.token = Some(regcache::config::Secret::new(token));
    })
    .await;
    let send = |method: Method, auth: Option<String>| {
        let mut req = app.client.request(method, app.url("/api/v1/jobs"));
        if let Some(a) = auth {
            req = req.header(AUTHORIZATION, a);
        }
        req.send()
    };
    for auth in [
        basic("alice", "alice-pw"),
        format!("Bearer {CI_TOKEN}"),
        format!("Bearer {token}"),
        // A browser asking for a login can send the admin token as the password.
        basic("admin", token),
    ] {
        let resp = send(Method::GET, Some(auth.clone())).await.unwrap();
        assert_eq!(resp.status(), 200, "{auth}");
    }
    let resp = send(Method::GET, Some(basic("bob", "bob-pw"))).await.unwrap();
    assert_eq!(resp.status(), 403);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("bob"), "{body}");
    for auth in [
        None,
        Some(basic("alice", "wrong")),
        Some("Bearer wrong-0123456789abcdef".into()),
    ] {
        let resp = send(Method::GET, auth.clone()).await.unwrap();
        assert_eq!(resp.status(), 401, "{auth:?}");
        let challenges: Vec<&str> = resp
            .headers()
            .get_all(WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        assert_eq!(
            challenges,
            [
                "Bearer realm=\"regcache-admin\"",
                "Basic realm=\"regcache-admin\""
            ]
        );
    }
    // An admin identity queues work like the token does; bob's refusal queued nothing.
    assert_eq!(app.count("SELECT count(*) FROM jobs"), 0);
    let resp = app
        .client
        .delete(app.url("/api/v1/cache"))
        .header(AUTHORIZATION, basic("alice", "alice-pw"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    assert_eq!(app.count("SELECT count(*) FROM jobs"), 1);
}

#[tokio::test]
async fn admin_rules_alone_enable_the_admin_api_without_a_token() {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let files = IdentityFiles::new(&[("alice", "alice-pw")], &[]);
    let app = TestApp::start_with(&[("fixture", &upstream.url())], |c| {
        c.auth.htpasswd_file = Some(files.htpasswd.clone());
        c.auth.rule = vec![rule(&["alice"], &[], true)];
    })
    .await;
    let resp = app
        .client
        .get(app.url("/api/v1/jobs"))
        .header(AUTHORIZATION, basic("alice", "alice-pw"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(app.get("/api/v1/jobs").await.status(), 401);
}

/// The status page `/` is admitted as the admin API is: an identity a rule gives `admin`
/// sees it, another identity gets 403, no login gets 401 with a Basic challenge (a
/// browser then asks). With `[auth]` in use and no admin at all, nobody sees it.
#[tokio::test]
async fn the_status_page_is_admitted_like_the_admin_api() {
    let s = setup().await;
    let alice = get(&s.app, "/", Some(&basic("alice", "alice-pw"))).await;
    assert_eq!(alice.status(), 200);
    assert!(
        alice.text().await.unwrap().contains("<html"),
        "alice sees the page"
    );
    let bob = get(&s.app, "/", Some(&basic("bob", "bob-pw"))).await;
    assert_eq!(bob.status(), 403);
    assert!(bob.text().await.unwrap().contains("bob"));
    let nobody = get(&s.app, "/", None).await;
    assert_eq!(nobody.status(), 401);
    assert!(challenge(&nobody).starts_with("Basic realm=\"regcache\""));
    let wrong = get(&s.app, "/", Some(&basic("alice", "guess"))).await;
    assert_eq!(wrong.status(), 401);

    // Rules, but nobody with admin and no admin token: closed to everyone.
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let files = IdentityFiles::new(&[("bob", "bob-pw")], &[]);
    let app = TestApp::start_with(&[("fixture", &upstream.url())], |c| {
        c.auth.htpasswd_file = Some(files.htpasswd.clone());
        c.auth.rule = vec![rule(&["bob"], &["**"], false), anonymous(&["**"])];
    })
    .await;
    for auth in [None, Some(basic("bob", "bob-pw"))] {
        let resp = get(&app, "/", auth.as_deref()).await;
        assert_eq!(resp.status(), 403, "{auth:?}");
    }
}
