//! `TestApp`: regcache started in-process on 127.0.0.1:0 with its own temporary data
//! directory, plus one helper per boundary (HTTP requests to it, its SQLite, its store).

use regcache::config::{self, Config, Duration as CfgDuration, UpstreamConfig};
use regcache::server::RunningServer;
use regcache::storage::BlobStore;
use reqwest::header::ACCEPT;
use std::path::{Path, PathBuf};

use super::images::{sha256_digest, Image, ACCEPT_ALL_MANIFESTS};

pub struct TestApp {
    server: Option<RunningServer>,
    pub config: Config,
    pub base: String,
    pub client: reqwest::Client,
    _dir: Option<tempfile::TempDir>,
}

/// A config with one upstream (the default) and data in `data_dir`.
pub fn config_for(upstreams: &[(&str, &str)], data_dir: &Path) -> Config {
    let mut c = config::load(None, Vec::new()).expect("embedded defaults load");
    c.server.listen = "127.0.0.1:0".into();
    c.server.data_dir = data_dir.to_owned();
    c.server.shutdown_grace = CfgDuration::from_secs(5);
    c.proxy.revalidate_timeout = CfgDuration::from_secs(2);
    c.proxy.read_timeout = CfgDuration::from_secs(5);
    c.upstream = upstreams
        .iter()
        .enumerate()
        .map(|(i, (name, url))| UpstreamConfig {
            name: (*name).into(),
            url: (*url).into(),
            default: i == 0,
            username: None,
            password: None,
            password_file: None,
            ttl: None,
            ns: None,
        })
        .collect();
    c
}

impl TestApp {
    /// Starts regcache in front of `upstream_url` (named "fixture", the default).
    pub async fn start(upstream_url: &str) -> TestApp {
        Self::start_with(&[("fixture", upstream_url)], |_| {}).await
    }

    pub async fn start_with(upstreams: &[(&str, &str)], tweak: impl FnOnce(&mut Config)) -> TestApp {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = config_for(upstreams, dir.path());
        tweak(&mut config);
        Self::start_config(config, Some(dir)).await
    }

    pub async fn start_config(config: Config, dir: Option<tempfile::TempDir>) -> TestApp {
        Self::launch(config, None, dir).await
    }

    /// Starts the server, with blobs in `store` when given instead of the configured backend.
    async fn launch(config: Config, store: Option<BlobStore>, dir: Option<tempfile::TempDir>) -> TestApp {
        init_logging();
        let server = regcache::server::start_with_store(config.clone(), store)
            .await
            .expect("regcache starts");
        let base = format!("http://{}", server.addr());
        TestApp {
            server: Some(server),
            config,
            base,
            client: reqwest::Client::new(),
            _dir: dir,
        }
    }

    /// The running server (panics after `stop`).
    pub fn server(&self) -> &RunningServer {
        self.server.as_ref().expect("the server is running")
    }

    pub fn data_dir(&self) -> PathBuf {
        self.config.server.data_dir.clone()
    }

    /// The running server's cache (its metadata and blob store), for tests that call the
    /// library beside it (bundle export and import).
    pub fn cache(&self) -> &std::sync::Arc<regcache::cache::Cache> {
        self.server.as_ref().expect("the app is running").cache()
    }

    /// Stops the server gracefully and starts it again on the same data dir (a new port).
    pub async fn restart_with(&mut self, tweak: impl FnOnce(&mut Config)) {
        self.relaunch(None, tweak).await;
    }

    /// Stops the server gracefully and starts it again on the same data dir.
    async fn relaunch(&mut self, store: Option<BlobStore>, tweak: impl FnOnce(&mut Config)) {
        self.stop().await;
        tweak(&mut self.config);
        let server = regcache::server::start_with_store(self.config.clone(), store)
            .await
            .expect("regcache restarts");
        self.base = format!("http://{}", server.addr());
        self.server = Some(server);
    }

    pub async fn stop(&mut self) {
        if let Some(s) = self.server.take() {
            s.stop().await.expect("clean shutdown");
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(self.url(path))
            .send()
            .await
            .expect("request to regcache")
    }

    pub async fn head(&self, path: &str) -> reqwest::Response {
        self.client
            .head(self.url(path))
            .send()
            .await
            .expect("request to regcache")
    }

    /// GET with an Accept header naming every manifest type, as real clients send.
    pub async fn get_manifest(&self, path: &str) -> reqwest::Response {
        self.client
            .get(self.url(path))
            .header(ACCEPT, ACCEPT_ALL_MANIFESTS)
            .send()
            .await
            .expect("request to regcache")
    }

    pub async fn get_range(&self, path: &str, range: &str) -> reqwest::Response {
        self.client
            .get(self.url(path))
            .header(reqwest::header::RANGE, range)
            .send()
            .await
            .expect("request to regcache")
    }

    /// Opens the metadata database read-only, for checks on what was recorded.
    pub fn db(&self) -> rusqlite::Connection {
        super::data_dir::db(&self.config.server.data_dir)
    }

    pub fn count(&self, sql: &str) -> i64 {
        super::data_dir::count(&self.config.server.data_dir, sql)
    }

    /// Files under the filesystem store's blob directory (`data_dir/store/blobs`).
    pub fn stored_blob_files(&self) -> Vec<PathBuf> {
        super::data_dir::blob_files(&self.config.server.data_dir)
    }

    /// Files left in the temporary download directory.
    pub fn tmp_files(&self) -> usize {
        std::fs::read_dir(self.data_dir().join("tmp")).map_or(0, |d| d.count())
    }

    /// The size of the largest file in the temporary download directory (0 when none):
    /// how far a transfer has written.
    pub fn largest_tmp_file(&self) -> u64 {
        std::fs::read_dir(self.data_dir().join("tmp"))
            .ok()
            .and_then(|d| {
                d.flatten()
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .max()
            })
            .unwrap_or(0)
    }
}

/// The body of a successful response, or a panic naming the status and error body.
pub async fn ok_bytes(resp: reqwest::Response) -> bytes::Bytes {
    let status = resp.status();
    let url = resp.url().clone();
    let body = resp.bytes().await.expect("response body");
    assert!(
        status.is_success(),
        "{url}: {status}: {}",
        String::from_utf8_lossy(&body)
    );
    body
}

/// Pulls `repo:reference` from `base` like a client: the manifest, then every blob; checks
/// every body byte for byte and every blob against its digest.
pub async fn pull_image(client: &reqwest::Client, base: &str, repo: &str, reference: &str, image: &Image) {
    let resp = client
        .get(format!("{base}/v2/{repo}/manifests/{reference}"))
        .header(ACCEPT, ACCEPT_ALL_MANIFESTS)
        .send()
        .await
        .expect("manifest request");
    assert_eq!(
        ok_bytes(resp).await,
        image.manifest.bytes,
        "manifest of {repo}:{reference}"
    );
    for blob in image.blobs() {
        let resp = client
            .get(format!("{base}/v2/{repo}/blobs/{}", blob.digest))
            .send()
            .await
            .expect("blob request");
        let body = ok_bytes(resp).await;
        assert_eq!(sha256_digest(&body), blob.digest, "blob of {repo} is intact");
        assert_eq!(body, blob.bytes, "blob {} of {repo}", blob.digest);
    }
}

impl TestApp {
    /// `pull_image` through this app.
    pub async fn pull(&self, repo: &str, reference: &str, image: &Image) {
        pull_image(&self.client, &self.base, repo, reference, image).await;
    }
}

/// The OCI error code of an error response.
pub async fn error_code(resp: reqwest::Response) -> (u16, String) {
    let status = resp.status().as_u16();
    let v: serde_json::Value = resp.json().await.expect("error body is JSON");
    let code = v["errors"][0]["code"].as_str().unwrap_or_default().to_owned();
    assert!(
        v["errors"][0]["message"].as_str().is_some_and(|m| !m.is_empty()),
        "error has a message: {v}"
    );
    (status, code)
}

/// Logs from regcache go to the test's captured output; `RUST_LOG` picks the level.
pub fn init_logging() {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

impl TestApp {
    /// Starts regcache with its blobs in `store` (for instance a `FailingStore`) instead of
    /// the configured backend; blobs then go through object_store put/get.
    pub async fn start_with_store(
        config: Config,
        store: std::sync::Arc<dyn object_store::ObjectStore>,
        dir: Option<tempfile::TempDir>,
    ) -> TestApp {
        Self::launch(config, Some(blob_store(store)), dir).await
    }

    /// `start_with_store` with the store's multipart API too (`BlobStore::with_multipart`),
    /// as the S3 and GCS backends have it.
    pub async fn start_with_blob_store(
        config: Config,
        store: BlobStore,
        dir: Option<tempfile::TempDir>,
    ) -> TestApp {
        Self::launch(config, Some(store), dir).await
    }

    /// `restart_with` for an app started by `start_with_store`: stops it gracefully and
    /// starts it again on the same data dir with `store` (pass the same one) injected.
    pub async fn restart_with_store(
        &mut self,
        store: std::sync::Arc<dyn object_store::ObjectStore>,
        tweak: impl FnOnce(&mut Config),
    ) {
        self.relaunch(Some(blob_store(store)), tweak).await;
    }
}

/// `store` as regcache's blob store: keys at its root, no local paths, no multipart API.
fn blob_store(store: std::sync::Arc<dyn object_store::ObjectStore>) -> BlobStore {
    BlobStore::new(store, String::new(), None, false)
}
