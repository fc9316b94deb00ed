//! Bundles end to end (issue 12, section 2): docker-registry is the only upstream, skopeo
//! fills the cache by pulling through regcache, `regcache export` writes a bundle, the
//! registry is stopped, `regcache import` loads the bundle into a fresh data dir with
//! `proxy.offline = true`, and skopeo and containerd pull every image from it with the
//! digests they had. Also: the bundle read by `skopeo inspect oci-archive:` and `ctr images
//! import`; an index exported with a platform filter and as `.tar.zst`; a delta bundle;
//! imports of a skopeo-written `oci-archive` and of an OCI layout directory; an import
//! beside a running server.

mod common;

use std::path::Path;

use common::app::TestApp;
use common::bundles::{
    bundle_blobs, bundle_index, bundle_names, regcache_fails, regcache_ok, seed_image, seed_index,
    tar_entries, Site,
};
use common::containerd::{write_hosts_toml, Containerd};
use common::external::{skopeo, skopeo_copy, DockerRegistry};
use common::images::{assert_layout_has, Image, Index};

const CREATED: &str = "2024-03-01T00:00:00Z";

/// Pulls `repo:tag` from regcache at `base` into a fresh OCI layout with skopeo (every
/// platform of an index), and checks that the top manifest and every blob below it came
/// with the digests it was pushed with.
async fn skopeo_pulls(base: &str, repo: &str, tag: &str, top: &str, digests: &[&str], work: &Path) {
    let host = base.trim_start_matches("http://");
    let out = work.join(format!("pulled-{}-{tag}", repo.replace('/', "-")));
    skopeo_copy(
        &format!("docker://{host}/{repo}:{tag}"),
        &format!("oci:{}:{tag}", out.display()),
        &["--all"],
    )
    .await
    .unwrap_or_else(|e| panic!("pulling {repo}:{tag} from {host}: {e}"));
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("index.json")).unwrap()).unwrap();
    assert_eq!(
        index["manifests"][0]["digest"].as_str(),
        Some(top),
        "{repo}:{tag} has the digest it was pushed with"
    );
    assert_layout_has(&out, digests);
}

fn image_digests(image: &Image) -> Vec<&str> {
    std::iter::once(image.manifest.digest.as_str())
        .chain(image.blobs().map(|b| b.digest.as_str()))
        .collect()
}

fn index_digests(index: &Index) -> Vec<&str> {
    std::iter::once(index.manifest.digest.as_str())
        .chain(index.blobs().map(|b| b.digest.as_str()))
        .collect()
}

/// What the registry holds in the round-trip tests.
struct Seeded {
    v1: Image,
    r10: Image,
    r11: Image,
    r20: Image,
    multi: Index,
}

async fn seed(registry: &DockerRegistry, work: &Path) -> Seeded {
    let s = Seeded {
        v1: Image::new("bundle-v1", &[300_000, 40_000], CREATED),
        r10: Image::new("bundle-r", &[200_000, 10_000], "2024-03-02T00:00:00Z"),
        // Shares its first layer with 1.0 (same seed, position and size).
        r11: Image::new("bundle-r", &[200_000, 20_000], "2024-03-03T00:00:00Z"),
        r20: Image::new("bundle-r20", &[5_000], CREATED),
        multi: Index::new("bundle-multi", &["amd64", "arm64"]),
    };
    seed_image(registry, work, "test/app", "v1", &s.v1).await;
    seed_image(registry, work, "test/app", "1.0", &s.r10).await;
    seed_image(registry, work, "test/app", "1.1", &s.r11).await;
    seed_image(registry, work, "test/app", "2.0", &s.r20).await;
    seed_index(registry, work, "test/multi", "v1", &s.multi).await;
    s
}

/// Pulls every seeded tag through the cache at `base` with skopeo (what fills it).
async fn fill(base: &str, work: &Path) {
    let host = base.trim_start_matches("http://");
    for (repo, tag) in [
        ("test/app", "v1"),
        ("test/app", "1.0"),
        ("test/app", "1.1"),
        ("test/app", "2.0"),
        ("test/multi", "v1"),
    ] {
        let out = work.join(format!("fill-{}-{tag}", repo.replace('/', "-")));
        skopeo_copy(
            &format!("docker://{host}/{repo}:{tag}"),
            &format!("oci:{}:{tag}", out.display()),
            &["--all"],
        )
        .await
        .unwrap_or_else(|e| panic!("filling the cache with {repo}:{tag}: {e}"));
    }
}

#[tokio::test]
async fn exported_images_are_served_offline_after_import_to_skopeo_and_containerd() {
    let registry = DockerRegistry::start().await;
    let work = tempfile::tempdir().unwrap();
    let seeded = seed(&registry, work.path()).await;
    let host = registry.host_port();

    // The edge of the internet: a cache filled by pulling through it.
    let source = Site::new(&registry.url(), false, "");
    let app = TestApp::start_config(source.config(), None).await;
    fill(&app.base, work.path()).await;

    // Export beside the running server: explicit tags, a regex, an index whole.
    let list = source.path("images.toml");
    std::fs::write(
        &list,
        format!(
            "[[image]]\nref = \"{host}/test/app\"\ntags = [\"v1\"]\ntag_regex = '^1\\.[0-9]+$'\n\n\
             [[image]]\nref = \"{host}/test/multi:v1\"\n"
        ),
    )
    .unwrap();
    let bundle = source.path("site.tar");
    let bundle_arg = bundle.to_str().unwrap();
    let done = regcache_ok(&[
        "export",
        "--config",
        source.config_arg(),
        list.to_str().unwrap(),
        "-o",
        bundle_arg,
        "--json",
    ])
    .await;
    assert_eq!(done["event"], "done", "{done}");
    let names = [
        format!("{host}/test/app:1.0"),
        format!("{host}/test/app:1.1"),
        format!("{host}/test/app:v1"),
        format!("{host}/test/multi:v1"),
    ];
    assert_eq!(bundle_names(&bundle), names, "2.0 is cached but not selected");
    let mut expected: Vec<&str> = [&seeded.v1, &seeded.r10, &seeded.r11]
        .into_iter()
        .flat_map(image_digests)
        .chain(index_digests(&seeded.multi))
        .collect();
    expected.sort_unstable();
    expected.dedup();
    assert_eq!(
        bundle_blobs(&bundle),
        expected,
        "every manifest and blob, each once"
    );
    let entries = tar_entries(&bundle);
    assert_eq!(entries[0].path, "oci-layout");
    assert_eq!(entries[1].path, "index.json");
    let list_file = std::fs::read_to_string(source.path("site.tar.digests")).unwrap();
    for d in &expected {
        assert!(list_file.contains(d), "the digest list names {d}");
    }

    // Other tools read the bundle as it is.
    for (name, top) in [
        (&names[2], &seeded.v1.manifest.digest),
        (&names[3], &seeded.multi.manifest.digest),
    ] {
        let out = skopeo(&["inspect", "--raw", &format!("oci-archive:{bundle_arg}:{name}")])
            .await
            .unwrap_or_else(|e| panic!("skopeo inspect of {name}: {e}"));
        assert_eq!(
            common::images::sha256_digest(&out.stdout),
            **top,
            "skopeo finds {name} in the bundle"
        );
    }
    let containerd = Containerd::start().await;
    containerd
        .ctr(&["images", "import", "--all-platforms", "--no-unpack", bundle_arg])
        .await
        .unwrap_or_else(|e| panic!("ctr images import: {e}"));
    let listed = containerd.ctr(&["images", "ls", "-q"]).await.unwrap();
    let mut listed: Vec<String> = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    listed.sort();
    assert_eq!(
        listed, names,
        "containerd named the images by io.containerd.image.name"
    );
    // containerd also stores an index of its own for the import, until its garbage
    // collector takes it: every bundle blob must be there, and at most that one more.
    let content = containerd.content_digests().await;
    for d in &expected {
        assert!(
            content.iter().any(|c| c == d),
            "containerd imported {d}: {content:?}"
        );
    }
    assert!(content.len() <= expected.len() + 1, "{content:?}");
    drop(containerd);
    drop(app);

    // Across the gap: the upstream is gone.
    drop(registry);
    let site = Site::new(&format!("http://{host}"), true, "");
    let done = regcache_ok(&["import", "--config", site.config_arg(), bundle_arg, "--json"]).await;
    assert_eq!(done["images"].as_array().map(Vec::len), Some(4), "{done}");
    assert_eq!(done["blobs_reused"], 0, "{done}");
    let app = TestApp::start_config(site.config(), None).await;
    for (tag, image) in [("v1", &seeded.v1), ("1.0", &seeded.r10), ("1.1", &seeded.r11)] {
        skopeo_pulls(
            &app.base,
            "test/app",
            tag,
            &image.manifest.digest,
            &image_digests(image),
            work.path(),
        )
        .await;
    }
    skopeo_pulls(
        &app.base,
        "test/multi",
        "v1",
        &seeded.multi.manifest.digest,
        &index_digests(&seeded.multi),
        work.path(),
    )
    .await;
    let missing = app.get_manifest("/v2/test/app/manifests/2.0").await;
    assert_eq!(missing.status(), 404, "2.0 was not exported");

    // containerd pulls through hosts.toml, asking with ns = the registry's host.
    let hosts = tempfile::tempdir().unwrap();
    write_hosts_toml(hosts.path(), &host, &format!("http://{host}"), &app.base);
    let containerd = Containerd::start().await;
    let ns = format!("?ns={}", host.replace(':', "%3A"));
    for (reference, extra) in [
        (format!("{host}/test/multi:v1"), &["--all-platforms"][..]),
        (format!("{host}/test/app:v1"), &[][..]),
    ] {
        let fetched = containerd.fetch(hosts.path(), &reference, extra).await;
        assert!(!fetched.requests.is_empty(), "{}", fetched.stderr);
        for url in &fetched.requests {
            assert!(
                url.starts_with(&app.base) && url.ends_with(&ns),
                "containerd asked {url}; everything must come from regcache with {ns}"
            );
        }
    }
    let mut want: Vec<&str> = index_digests(&seeded.multi)
        .into_iter()
        .chain(image_digests(&seeded.v1))
        .collect();
    want.sort_unstable();
    assert_eq!(containerd.content_digests().await, want);
}

#[tokio::test]
async fn an_index_exported_for_one_platform_as_tar_zst_serves_that_platform() {
    let registry = DockerRegistry::start().await;
    let work = tempfile::tempdir().unwrap();
    let multi = Index::new("zst-multi", &["amd64", "arm64"]);
    seed_index(&registry, work.path(), "test/multi", "v1", &multi).await;
    let host = registry.host_port();
    let source = Site::new(&registry.url(), false, "");
    let app = TestApp::start_config(source.config(), None).await;
    skopeo_copy(
        &format!(
            "docker://{}/test/multi:v1",
            app.base.trim_start_matches("http://")
        ),
        &format!("oci:{}:v1", work.path().join("fill").display()),
        &["--all"],
    )
    .await
    .unwrap();

    let list = source.path("arm.toml");
    std::fs::write(
        &list,
        format!("[[image]]\nref = \"{host}/test/multi:v1\"\nplatforms = [\"linux/arm64\"]\n"),
    )
    .unwrap();
    let bundle = source.path("arm.tar.zst");
    regcache_ok(&[
        "export",
        "--config",
        source.config_arg(),
        list.to_str().unwrap(),
        "-o",
        bundle.to_str().unwrap(),
    ])
    .await;
    let raw = std::fs::read(&bundle).unwrap();
    assert_eq!(&raw[..4], &[0x28, 0xb5, 0x2f, 0xfd], "zstd-compressed");
    let arm = multi.image("arm64").unwrap();
    let amd = multi.image("amd64").unwrap();
    let mut expected: Vec<&str> = std::iter::once(multi.manifest.digest.as_str())
        .chain(image_digests(arm))
        .collect();
    expected.sort_unstable();
    assert_eq!(
        bundle_blobs(&bundle),
        expected,
        "the index whole, and only the arm64 image under it"
    );
    // A platform the index does not have is an error naming it, and writes nothing.
    std::fs::write(
        &list,
        format!("[[image]]\nref = \"{host}/test/multi:v1\"\nplatforms = [\"linux/s390x\"]\n"),
    )
    .unwrap();
    let other = source.path("none.tar");
    let err = regcache_fails(&[
        "export",
        "--config",
        source.config_arg(),
        list.to_str().unwrap(),
        "-o",
        other.to_str().unwrap(),
    ])
    .await;
    assert!(
        err.contains("linux/s390x") && err.contains("test/multi:v1"),
        "{err}"
    );
    assert!(!other.exists() && !source.path("none.tar.digests").exists());
    drop(app);
    drop(registry);

    let site = Site::new(&format!("http://{host}"), true, "");
    let done = regcache_ok(&[
        "import",
        "--config",
        site.config_arg(),
        bundle.to_str().unwrap(),
        "--json",
    ])
    .await;
    assert_eq!(done["children_absent"], 1, "{done}");
    let app = TestApp::start_config(site.config(), None).await;
    let body = common::app::ok_bytes(app.get_manifest("/v2/test/multi/manifests/v1").await).await;
    assert_eq!(body, multi.manifest.bytes, "the index as it was pushed");
    app.pull("test/multi", &arm.manifest.digest, arm).await;
    let absent = app
        .get_manifest(&format!("/v2/test/multi/manifests/{}", amd.manifest.digest))
        .await;
    assert_eq!(absent.status(), 404, "amd64 was filtered out");
    let out = work.path().join("arm-pull");
    skopeo_copy(
        &format!(
            "docker://{}/test/multi:v1",
            app.base.trim_start_matches("http://")
        ),
        &format!("oci:{}:v1", out.display()),
        &["--override-arch", "arm64"],
    )
    .await
    .unwrap();
    assert_layout_has(&out, &image_digests(arm));
}

#[tokio::test]
async fn a_delta_carries_only_new_blobs_and_full_plus_delta_is_everything() {
    let registry = DockerRegistry::start().await;
    let work = tempfile::tempdir().unwrap();
    let v1 = Image::new("delta", &[150_000, 30_000], "2024-04-01T00:00:00Z");
    // Same seed and first layer size: shares that layer with v1.
    let v2 = Image::new("delta", &[150_000, 60_000], "2024-04-08T00:00:00Z");
    seed_image(&registry, work.path(), "test/app", "v1", &v1).await;
    let host = registry.host_port();
    let source = Site::new(&registry.url(), false, "");
    let app = TestApp::start_config(source.config(), None).await;
    let pull = |tag: &'static str| {
        let base = app.base.trim_start_matches("http://").to_owned();
        let out = work.path().join(format!("fill-{tag}"));
        async move {
            skopeo_copy(
                &format!("docker://{base}/test/app:{tag}"),
                &format!("oci:{}:{tag}", out.display()),
                &[],
            )
            .await
            .unwrap();
        }
    };
    pull("v1").await;
    let full = source.path("week1.tar");
    regcache_ok(&[
        "export",
        "--config",
        source.config_arg(),
        "--all",
        "-o",
        full.to_str().unwrap(),
    ])
    .await;
    seed_image(&registry, work.path(), "test/app", "v2", &v2).await;
    pull("v2").await;

    // The delta, from the digest list and from the earlier bundle itself: the same.
    let delta = source.path("week2.tar");
    let since = source.path("week1.tar.digests");
    let done = regcache_ok(&[
        "export",
        "--config",
        source.config_arg(),
        "--all",
        "--since",
        since.to_str().unwrap(),
        "-o",
        delta.to_str().unwrap(),
        "--json",
    ])
    .await;
    let mut new: Vec<&str> = vec![
        v2.manifest.digest.as_str(),
        v2.config.digest.as_str(),
        v2.layers[1].digest.as_str(),
    ];
    new.sort_unstable();
    assert_eq!(bundle_blobs(&delta), new, "only what week 1 did not carry");
    assert_eq!(done["left_out"], 4, "v1's manifest, config, layers; {done}");
    assert_eq!(
        bundle_names(&delta),
        [format!("{host}/test/app:v1"), format!("{host}/test/app:v2")],
        "the delta names every image"
    );
    assert_eq!(
        bundle_index(&delta)["annotations"]["io.regcache.bundle.delta-of"],
        "week1.tar"
    );
    let from_bundle = source.path("week2b.tar");
    regcache_ok(&[
        "export",
        "--config",
        source.config_arg(),
        "--all",
        "--since",
        full.to_str().unwrap(),
        "-o",
        from_bundle.to_str().unwrap(),
    ])
    .await;
    assert_eq!(bundle_blobs(&from_bundle), new);
    drop(app);
    drop(registry);

    // The delta alone is not enough, says so, and links nothing.
    let alone = Site::new(&format!("http://{host}"), true, "");
    let err = regcache_fails(&["import", "--config", alone.config_arg(), delta.to_str().unwrap()]).await;
    assert!(
        err.contains("delta of week1.tar") && err.contains(&v1.manifest.digest),
        "{err}"
    );
    assert_eq!(
        common::data_dir::count(&alone.data_dir(), "SELECT count(*) FROM tags"),
        0
    );

    let site = Site::new(&format!("http://{host}"), true, "");
    for b in [&full, &delta] {
        regcache_ok(&["import", "--config", site.config_arg(), b.to_str().unwrap()]).await;
    }
    let app = TestApp::start_config(site.config(), None).await;
    for (tag, image) in [("v1", &v1), ("v2", &v2)] {
        skopeo_pulls(
            &app.base,
            "test/app",
            tag,
            &image.manifest.digest,
            &image_digests(image),
            work.path(),
        )
        .await;
    }
}

#[tokio::test]
async fn a_skopeo_oci_archive_and_an_oci_layout_directory_import() {
    let registry = DockerRegistry::start().await;
    let work = tempfile::tempdir().unwrap();
    let image = Image::new("archive", &[120_000, 8_000], CREATED);
    let multi = Index::new("layout-dir", &["amd64", "arm64"]);
    seed_image(&registry, work.path(), "test/app", "v1", &image).await;
    seed_index(&registry, work.path(), "test/multi", "v1", &multi).await;
    let host = registry.host_port();

    // skopeo writes index.json after the blobs: the import must not depend on the order.
    let archive = work.path().join("skopeo.tar");
    skopeo_copy(
        &format!("docker://{host}/test/app:v1"),
        &format!("oci-archive:{}:{host}/test/app:v1", archive.display()),
        &[],
    )
    .await
    .unwrap();
    let order: Vec<String> = tar_entries(&archive).into_iter().map(|e| e.path).collect();
    let index_at = order.iter().position(|p| p == "index.json").unwrap();
    assert!(
        order[..index_at]
            .iter()
            .any(|p| p.starts_with("blobs/sha256/") && p.len() > 14),
        "skopeo put blobs before index.json: {order:?}"
    );
    let dir = work.path().join("layout");
    skopeo_copy(
        &format!("docker://{host}/test/multi:v1"),
        &format!("oci:{}:{host}/test/multi:v1", dir.display()),
        &["--all"],
    )
    .await
    .unwrap();
    // An archive whose image has only a tag for a name cannot say where it goes.
    let bare = work.path().join("bare.tar");
    skopeo_copy(
        &format!("docker://{host}/test/app:v1"),
        &format!("oci-archive:{}:v1", bare.display()),
        &[],
    )
    .await
    .unwrap();
    drop(registry);

    let site = Site::new(&format!("http://{host}"), true, "");
    let err = regcache_fails(&["import", "--config", site.config_arg(), bare.to_str().unwrap()]).await;
    assert!(err.contains("index.json") && err.contains("\"v1\""), "{err}");
    regcache_ok(&["import", "--config", site.config_arg(), archive.to_str().unwrap()]).await;
    let done = regcache_ok(&[
        "import",
        "--config",
        site.config_arg(),
        dir.to_str().unwrap(),
        "--json",
    ])
    .await;
    assert_eq!(done["images"][0], format!("{host}/test/multi:v1"), "{done}");
    let app = TestApp::start_config(site.config(), None).await;
    skopeo_pulls(
        &app.base,
        "test/app",
        "v1",
        &image.manifest.digest,
        &image_digests(&image),
        work.path(),
    )
    .await;
    skopeo_pulls(
        &app.base,
        "test/multi",
        "v1",
        &multi.manifest.digest,
        &index_digests(&multi),
        work.path(),
    )
    .await;
}
