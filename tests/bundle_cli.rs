//! `regcache export` and `regcache import` refuse bad input with a message naming the
//! argument, list entry or bundle entry, and change nothing: no bundle file is left, no
//! image is linked. `--upstream` places images under the upstream named, and pins made
//! before an import apply to what it brings.

mod common;

use common::app::TestApp;
use common::bundles::{regcache_fails, regcache_ok, Site};
use common::data_dir::count;
use common::fixture_upstream::{FixtureOptions, FixtureUpstream};
use common::images::Image;

#[tokio::test]
async fn bad_exports_and_imports_are_refused_naming_what_is_wrong() {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let image = Image::new("cli", &[4_000], "2024-07-01T00:00:00Z");
    upstream.add_image("team/app", Some("v1"), &image);
    let host = upstream.host_port();
    let site = Site::new(&upstream.url(), false, "");
    let mut app = TestApp::start_config(site.config(), None).await;
    app.pull("team/app", "v1", &image).await;
    app.stop().await;
    let config = site.config_arg();
    let out = site.path("out.tar");
    let out_arg = out.to_str().unwrap();

    let list = site.path("list.toml");
    let list_arg = list.to_str().unwrap();
    for (text, needles) in [
        (
            format!("[[image]]\nref = \"{host}/team/app:v2\"\n"),
            vec!["image[0]", "tag v2 is not cached"],
        ),
        (
            format!("[[image]]\nref = \"{host}/team/app\"\ntag_regex = '^x'\n"),
            vec!["image[0]", "no cached tag", "^x"],
        ),
        (
            "[[image]]\nref = \"quay.io/team/app:v1\"\n".to_owned(),
            vec!["image[0]", "quay.io"],
        ),
        (
            format!("[[image]]\nref = \"{host}/team/app\"\n"),
            vec!["image[0].ref", "names no image"],
        ),
    ] {
        std::fs::write(&list, &text).unwrap();
        let err = regcache_fails(&["export", "--config", config, list_arg, "-o", out_arg]).await;
        for n in needles {
            assert!(err.contains(n), "{text}: stderr does not name {n:?}: {err}");
        }
        assert!(!out.exists(), "nothing written for {text}");
    }
    let err = regcache_fails(&["export", "--config", config, "-o", out_arg]).await;
    assert!(err.contains("--all") || err.contains("<LIST>"), "{err}");
    let err = regcache_fails(&[
        "export", "--config", config, "--all", "-o", out_arg, "--since", list_arg,
    ])
    .await;
    assert!(err.contains("--since") && err.contains(list_arg), "{err}");
    assert!(!out.exists());

    regcache_ok(&["export", "--config", config, "--all", "-o", out_arg]).await;
    let fresh = Site::new(&upstream.url(), true, "");
    let fresh_arg = fresh.config_arg();
    let err = regcache_fails(&["import", "--config", fresh_arg, out_arg, "--upstream", "nope"]).await;
    assert!(
        err.contains("--upstream \"nope\"") && err.contains("cncf"),
        "{err}"
    );
    let gz = site.path("bundle.tar.gz");
    std::fs::write(&gz, [0x1f, 0x8b, 8, 0, 0, 0, 0, 0]).unwrap();
    let err = regcache_fails(&["import", "--config", fresh_arg, gz.to_str().unwrap()]).await;
    assert!(err.contains("gzip"), "{err}");
    let junk = site.path("junk.tar");
    std::fs::write(&junk, vec![b'x'; 2048]).unwrap();
    let err = regcache_fails(&["import", "--config", fresh_arg, junk.to_str().unwrap()]).await;
    assert!(err.contains("junk.tar") && err.contains("tar"), "{err}");
    let err = regcache_fails(&[
        "import",
        "--config",
        fresh_arg,
        site.path("missing.tar").to_str().unwrap(),
    ])
    .await;
    assert!(err.contains("missing.tar"), "{err}");
    assert_eq!(count(&fresh.data_dir(), "SELECT count(*) FROM tags"), 0);

    // Under another upstream by --upstream: the name's host does not matter then.
    let other = Site::new(
        "http://127.0.0.1:9",
        true,
        "[[upstream]]\nname = \"mirror\"\nurl = \"http://127.0.0.1:10\"\n",
    );
    // A pin made there before the import applies to what is imported, as to a pull. (The
    // refused import of the junk file has created the site's database, which `pin` needs.)
    regcache_fails(&["import", "--config", other.config_arg(), junk.to_str().unwrap()]).await;
    regcache_ok(&["pin", "--config", other.config_arg(), "mirror/team/app:v1"]).await;
    regcache_ok(&[
        "import",
        "--config",
        other.config_arg(),
        out_arg,
        "--upstream",
        "mirror",
    ])
    .await;
    assert_eq!(
        count(
            &other.data_dir(),
            "SELECT count(*) FROM tags t JOIN repositories r ON r.id = t.repo_id \
             WHERE r.upstream = 'mirror' AND r.name = 'team/app' AND t.name = 'v1' \
               AND t.pinned = 1 AND t.expires_at IS NULL"
        ),
        1,
        "imported under --upstream, and pinned"
    );
    assert_eq!(
        count(
            &other.data_dir(),
            "SELECT count(*) FROM repo_blobs WHERE pinned = 0"
        ),
        0,
        "every blob of the pinned image is pinned"
    );
}

/// An image list entry with `pin = true` travels in the bundle and pins the image at the
/// site that imports it; the entry without it arrives as an ordinary entry (it gets its
/// expiry from the ttl when a server first applies it to this fresh data dir).
#[tokio::test]
async fn a_pin_in_the_export_list_pins_the_imported_image() {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let kept = Image::new("kept", &[3_000], "2024-07-01T00:00:00Z");
    let plain = Image::new("plain", &[3_000], "2024-07-02T00:00:00Z");
    upstream.add_image("team/kept", Some("v1"), &kept);
    upstream.add_image("team/plain", Some("v1"), &plain);
    let host = upstream.host_port();
    let site = Site::new(&upstream.url(), false, "");
    let mut app = TestApp::start_config(site.config(), None).await;
    app.pull("team/kept", "v1", &kept).await;
    app.pull("team/plain", "v1", &plain).await;
    app.stop().await;
    let list = site.path("list.toml");
    std::fs::write(
        &list,
        format!(
            "[[image]]\nref = \"{host}/team/kept\"\ntags = [\"v1\"]\npin = true\n\
             [[image]]\nref = \"{host}/team/plain:v1\"\n"
        ),
    )
    .unwrap();
    let out = site.path("pinned.tar");
    let out_arg = out.to_str().unwrap();
    regcache_ok(&[
        "export",
        "--config",
        site.config_arg(),
        list.to_str().unwrap(),
        "-o",
        out_arg,
    ])
    .await;

    let fresh = Site::new(&upstream.url(), true, "");
    regcache_ok(&["import", "--config", fresh.config_arg(), out_arg]).await;
    let tag_rows = |repo: &str, pinned: bool| {
        count(
            &fresh.data_dir(),
            &format!(
                "SELECT count(*) FROM tags t JOIN repositories r ON r.id = t.repo_id \
                 WHERE r.name = '{repo}' AND t.name = 'v1' AND t.pinned = {}",
                i32::from(pinned)
            ),
        )
    };
    assert_eq!(
        tag_rows("team/kept", true),
        1,
        "the listed pin arrived with the image"
    );
    assert_eq!(
        tag_rows("team/plain", false),
        1,
        "an entry without pin is an ordinary one"
    );
    assert_eq!(
        count(&fresh.data_dir(), "SELECT count(*) FROM pins"),
        1,
        "one pin, for the entry that asked for it"
    );
    assert_eq!(
        count(
            &fresh.data_dir(),
            "SELECT count(*) FROM pins WHERE repo = 'team/kept' AND reference = 'v1'"
        ),
        1
    );
}

/// A layout directory whose blob is a FIFO (or any special file) is refused naming it,
/// without opening it: opening a FIFO would block the import forever.
#[tokio::test]
async fn a_special_file_in_a_layout_directory_is_refused_not_opened() {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let site = Site::new(&upstream.url(), true, "");
    let layout = site.path("layout");
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::write(layout.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    std::fs::write(
        layout.join("index.json"),
        r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#,
    )
    .unwrap();
    let fifo = blobs.join("ab".repeat(32));
    let made = std::process::Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success(), "mkfifo");
    let err = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        regcache_fails(&["import", "--config", site.config_arg(), layout.to_str().unwrap()]),
    )
    .await
    .expect("the import returns instead of blocking on the FIFO");
    assert!(
        err.contains(&"ab".repeat(32)) && err.contains("special file"),
        "{err}"
    );
}

/// A bundle whose GNU long-name entry claims a gigabyte is refused when its header is
/// read, naming the bundle and the entry's size: the `tar` crate would read such an entry
/// whole into memory (a crafted bundle could exhaust the importing machine's).
#[tokio::test]
async fn a_long_name_entry_claiming_a_gigabyte_is_refused_before_it_is_read() {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let site = Site::new(&upstream.url(), true, "");
    let bundle = site.path("crafted.tar");
    let mut b = tar::Builder::new(Vec::new());
    let layout = br#"{"imageLayoutVersion":"1.0.0"}"#;
    let mut h = tar::Header::new_gnu();
    h.set_size(layout.len() as u64);
    h.set_mode(0o644);
    b.append_data(&mut h, "oci-layout", layout.as_slice()).unwrap();
    let mut bytes = b.into_inner().unwrap();
    bytes.truncate(bytes.len() - 1024);
    let mut long = tar::Header::new_gnu();
    long.as_gnu_mut().unwrap().name[..13].copy_from_slice(b"././@LongLink");
    long.set_entry_type(tar::EntryType::GNULongName);
    long.set_size(1 << 30);
    long.set_mode(0o644);
    long.set_cksum();
    bytes.extend_from_slice(long.as_bytes());
    bytes.extend_from_slice(&[b'a'; 4096]);
    std::fs::write(&bundle, &bytes).unwrap();
    let err = regcache_fails(&["import", "--config", site.config_arg(), bundle.to_str().unwrap()]).await;
    assert!(
        err.contains("crafted.tar") && err.contains("GNU long name entry of 1073741824 bytes"),
        "{err}"
    );
    assert_eq!(count(&site.data_dir(), "SELECT count(*) FROM tags"), 0);
}
