//! Configuration: a TOML file plus `REGCACHE_` environment overrides, loaded with figment
//! and validated before anything starts. Every error names the key it is about.
//! This module reads files named by the config (secrets) but starts nothing.

mod auth;
mod duration;
mod env;
mod explain;
mod load;
mod secret;
mod size;
mod validate;

pub use auth::{AuthConfig, AuthRule, CertIdentity};
pub use duration::Duration;
pub use explain::KeyContext;
pub use load::{load, load_report, ConfigError, Loaded, CONFIG_FILE_VAR};
pub use secret::Secret;
pub use size::ByteSize;
pub use validate::check_data_dir;

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// The whole effective configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub storage: StorageConfig,
    #[serde(default)]
    pub proxy: ProxyConfig,
    /// Upstream registries. Empty means "Docker Hub only", filled in by [`load`].
    #[serde(default)]
    pub upstream: Vec<UpstreamConfig>,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub jobs: JobsConfig,
    #[serde(default)]
    pub cleanup: CleanupConfig,
    /// Image lists the server prefetches on a cadence, as durable jobs.
    #[serde(default)]
    pub prefetch: Vec<PrefetchConfig>,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub auth: AuthConfig,
}

/// One image list the server fills the cache with on a cadence (`regcache prefetch`, run
/// as a job).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrefetchConfig {
    /// Name used in job arguments and logs. Default `prefetch-<n>`.
    #[serde(default)]
    pub name: String,
    /// The image list file (TOML, see README "Prefetch"). Read when the job runs.
    pub list: PathBuf,
    /// How often the list is prefetched; the first run is at start-up. Default `1d`.
    #[serde(default = "default_cadence")]
    pub cadence: Duration,
}

/// `/metrics` (Prometheus text format) and the per-request counting behind it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Count requests and serve `/metrics`. Default true. When false, neither happens
    /// (the status page then shows no hit ratio).
    #[serde(default = "yes")]
    pub enabled: bool,
    /// A separate address for `/metrics` (and `/livez`, `/readyz`); default: the
    /// registry's listener.
    pub listen: Option<String>,
    /// Bearer token Prometheus must send. Default: none, `/metrics` is open.
    pub token: Option<Secret>,
    /// Or read the token from a file (not both).
    pub token_file: Option<PathBuf>,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: None,
            token: None,
            token_file: None,
        }
    }
}

/// The admin API (`/api/v1/...`).
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// A separate address for the admin API; default: the registry's listener.
    pub listen: Option<String>,
    /// Bearer token clients must send. Without one the admin API answers 403.
    pub token: Option<Secret>,
    /// Or read the token from a file (not both).
    pub token_file: Option<PathBuf>,
}

/// Operator-requested jobs (purge, repository deletion, cleanup).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobsConfig {
    /// Workers for purge and cleanup jobs. Default 2.
    #[serde(default = "two")]
    pub workers: usize,
    /// Workers deleting repositories. Default 2.
    #[serde(default = "two")]
    pub delete_workers: usize,
    /// Runs of a job that may end in an error before it is `failed`. Default 5.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Wait before retrying a job that failed; doubles per attempt. Default `10s`.
    #[serde(default = "default_retry_initial")]
    pub retry_initial: Duration,
    /// Longest wait between retries. Default `10m`.
    #[serde(default = "default_job_retry_max")]
    pub retry_max: Duration,
    /// Time budget of one run of a repository deletion; the rest is left for the next run.
    /// Default `1m`.
    #[serde(default = "default_max_run_time")]
    pub max_run_time: Duration,
    /// Tags or links removed per transaction by a repository deletion. Default 1000.
    #[serde(default = "default_delete_batch")]
    pub delete_batch: u32,
    /// A running job or repository deletion not heard from for this long is taken back by
    /// the sweeper (its worker died). Default `10m`.
    #[serde(default = "default_stale_after")]
    pub stale_after: Duration,
    /// How often the sweeper looks for stale work. Default `5m`.
    #[serde(default = "default_sweep_interval")]
    pub sweep_interval: Duration,
}

impl Default for JobsConfig {
    fn default() -> Self {
        Self {
            workers: two(),
            delete_workers: two(),
            max_attempts: default_max_attempts(),
            retry_initial: default_retry_initial(),
            retry_max: default_job_retry_max(),
            max_run_time: default_max_run_time(),
            delete_batch: default_delete_batch(),
            stale_after: default_stale_after(),
            sweep_interval: default_sweep_interval(),
        }
    }
}

/// Cleanup policies: which tags of which repositories to delete, on a cadence.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct CleanupConfig {
    #[serde(default)]
    pub policy: Vec<CleanupPolicy>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CleanupPolicy {
    /// Name used in job arguments and logs. Default `policy-<n>`.
    #[serde(default)]
    pub name: String,
    /// Glob over `upstream/repository`: `*` matches within one path segment, `**` across
    /// segments, `?` one character.
    pub repositories: String,
    /// Always keep this many of the newest (by image `created`) candidate tags. Default 0.
    #[serde(default)]
    pub keep_n: usize,
    /// Only delete candidates created longer ago than this. Default: any age.
    pub older_than: Option<Duration>,
    /// Tags whose name matches are candidates. Default `.*`.
    #[serde(default = "default_regex_delete")]
    pub name_regex_delete: String,
    /// Tags whose name matches are never deleted. Default: none.
    pub name_regex_keep: Option<String>,
    /// How often the policy runs for each repository. Default `1d`.
    #[serde(default = "default_cadence")]
    pub cadence: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Address the registry API listens on. Default `127.0.0.1:5000`.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Where the SQLite database, temporary files and (for the filesystem backend) blobs
    /// live. Default `./regcache-data`.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// How long shutdown waits for in-flight requests and transfers. Default `30s`.
    #[serde(default = "default_shutdown_grace")]
    pub shutdown_grace: Duration,
    /// Longest time a client may take to send a request's headers, from the connection's
    /// start or its first byte after an idle spell; then the connection is closed.
    /// Default `30s`.
    #[serde(default = "default_header_timeout")]
    pub header_timeout: Duration,
    /// A keep-alive connection with no request for this long is closed. Default `75s`.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: Duration,
    /// A response the client takes no bytes of for this long is ended and its connection
    /// closed. Default `60s`.
    #[serde(default = "default_send_timeout")]
    pub send_timeout: Duration,
    /// Open client connections, per listener, past which new ones are refused at once.
    /// Default 10000.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// HTTPS on `listen` (and on `admin.listen`). Default: plain HTTP.
    pub tls: Option<TlsConfig>,
}

/// `[server.tls]`: the listeners speak TLS 1.2 and 1.3 (rustls), offering HTTP/2 and
/// HTTP/1.1 by ALPN. The files are read again when they change.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, the server's certificate first.
    pub cert_file: PathBuf,
    /// PEM private key of that certificate (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// PEM CA certificates client certificates must chain to. Default: none; clients
    /// are not asked for a certificate.
    pub client_ca_file: Option<PathBuf>,
    /// With `client_ca_file`: whether a client must present a certificate. Default
    /// `required`.
    pub client_auth: Option<ClientAuth>,
}

/// Whether a client certificate is required (`server.tls.client_auth`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    /// Clients without a certificate are served too; one that presents a certificate
    /// must present a valid one.
    Optional,
    /// The handshake fails without a valid client certificate.
    Required,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            data_dir: default_data_dir(),
            shutdown_grace: default_shutdown_grace(),
            header_timeout: default_header_timeout(),
            idle_timeout: default_idle_timeout(),
            send_timeout: default_send_timeout(),
            max_connections: default_max_connections(),
            tls: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    #[default]
    Filesystem,
    S3,
    Gcs,
    Memory,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    #[serde(default)]
    pub backend: Backend,
    #[serde(default)]
    pub delete: DeleteConfig,
    /// Filesystem backend only: fsync blobs before they are committed. Default false.
    #[serde(default)]
    pub fsync: bool,
    /// Bound on stored blob bytes; past it the least recently used content is expired
    /// until `low_watermark_percent` of it remains. Default: no bound.
    pub max_size: Option<ByteSize>,
    /// Where eviction stops, in percent of `max_size`. Default 90.
    #[serde(default = "default_low_watermark")]
    pub low_watermark_percent: u8,
    /// The largest blob regcache transfers, in bytes: an upstream answer announcing more
    /// is refused before its body is read, and a body sent without `Content-Length` is cut
    /// off past it (and past the room `max_size` leaves, for caching). Default `64GiB`.
    #[serde(default = "default_max_blob_size")]
    pub max_blob_size: ByteSize,
    /// How often reconciliation (storage against metadata) runs in the server; it also
    /// runs once at start-up. `"0"` = only at start-up. Default `24h`.
    #[serde(default = "default_reconcile_interval")]
    pub reconcile_interval: Duration,
    /// Objects without metadata younger than this are left alone by reconciliation (they
    /// may be mid-commit). Default `1h`.
    #[serde(default = "default_reconcile_grace")]
    pub reconcile_grace: Duration,
    pub s3: Option<S3Config>,
    pub gcs: Option<GcsConfig>,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            backend: Backend::default(),
            delete: DeleteConfig::default(),
            fsync: false,
            max_size: None,
            low_watermark_percent: default_low_watermark(),
            max_blob_size: default_max_blob_size(),
            reconcile_interval: default_reconcile_interval(),
            reconcile_grace: default_reconcile_grace(),
            s3: None,
            gcs: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeleteConfig {
    /// Whether blobs may be removed from storage. Default true. When false nothing is
    /// removed: expired entries are kept (and served) as deferred until deletes are on.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Storage deletes in flight at once (parts of a claimed batch; on the filesystem, one
    /// unlinking thread each). Default 16.
    #[serde(default = "default_delete_workers")]
    pub workers: usize,
    /// Wait before the first retry of a failed delete; doubles per attempt. Default `10s`.
    #[serde(default = "default_retry_initial")]
    pub retry_initial: Duration,
    /// Longest wait between retries of a failed delete. Default `1h`.
    #[serde(default = "default_retry_max")]
    pub retry_max: Duration,
}

impl Default for DeleteConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            workers: default_delete_workers(),
            retry_initial: default_retry_initial(),
            retry_max: default_retry_max(),
        }
    }
}

fn default_delete_workers() -> usize {
    16
}
fn default_retry_initial() -> Duration {
    Duration::from_secs(10)
}
fn default_retry_max() -> Duration {
    Duration::from_secs(3600)
}
fn default_reconcile_interval() -> Duration {
    Duration::from_secs(86_400)
}
fn default_reconcile_grace() -> Duration {
    Duration::from_secs(3600)
}
fn default_low_watermark() -> u8 {
    90
}
/// Larger than any layer seen in practice (the largest public ones are tens of GiB), small
/// enough that an upstream cannot stream without end into the temporary directory.
fn default_max_blob_size() -> ByteSize {
    ByteSize::from_bytes(64 << 30)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    pub bucket: String,
    #[serde(default = "default_region")]
    pub region: String,
    /// Custom endpoint (MinIO, moto, Ceph...). Default: AWS.
    pub endpoint: Option<String>,
    /// Allow plain-HTTP endpoints. Default false.
    #[serde(default)]
    pub allow_http: bool,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<Secret>,
    pub secret_access_key_file: Option<PathBuf>,
    /// Key prefix inside the bucket. Default none.
    #[serde(default)]
    pub prefix: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GcsConfig {
    pub bucket: String,
    /// Path to a service account JSON key file.
    pub service_account_path: Option<PathBuf>,
    /// Service account JSON key given inline.
    pub service_account_key: Option<Secret>,
    /// Override of the API base URL (for emulators).
    pub base_url: Option<String>,
    /// Allow plain-HTTP base URLs. Default false.
    #[serde(default)]
    pub allow_http: bool,
    #[serde(default)]
    pub prefix: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// How long unused content stays cached; `"0"` keeps it forever. Default `7d`.
    #[serde(default = "default_ttl")]
    pub ttl: Duration,
    /// Never contact an upstream; serve only what is cached. Default false.
    #[serde(default)]
    pub offline: bool,
    /// How long a tag's manifest is trusted before it is revalidated with an upstream
    /// HEAD. `"0"` (the default) revalidates on every request.
    #[serde(default)]
    pub revalidate_after: Duration,
    /// Upstream TCP/TLS connect timeout. Default `10s`.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: Duration,
    /// Longest silence tolerated while reading an upstream response. Default `30s`.
    #[serde(default = "default_read_timeout")]
    pub read_timeout: Duration,
    /// Timeout for a tag revalidation HEAD; when it passes the cached manifest is
    /// served. Default `5s`.
    #[serde(default = "default_revalidate_timeout")]
    pub revalidate_timeout: Duration,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            ttl: default_ttl(),
            offline: false,
            revalidate_after: Duration::ZERO,
            connect_timeout: default_connect_timeout(),
            read_timeout: default_read_timeout(),
            revalidate_timeout: default_revalidate_timeout(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Short name: used in path prefixes (`/v2/<name>/<repo>`) and matched against
    /// containerd's `ns` parameter.
    pub name: String,
    /// Base URL, e.g. `https://registry-1.docker.io`.
    pub url: String,
    /// Serves requests that name no upstream. At most one upstream may set it.
    #[serde(default)]
    pub default: bool,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub password_file: Option<PathBuf>,
    /// Per-upstream override of `proxy.ttl`.
    pub ttl: Option<Duration>,
    /// For an upstream that is itself a mirror honouring containerd's `ns` (another
    /// regcache, say a regional cache): the registry to ask it for, sent as `?ns=<value>`
    /// on every request to it (manifests, blobs, tags, referrers). `docker.io` also gives
    /// Docker Hub's `library/` naming. Default: none.
    pub ns: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `tracing` filter directive. Default `info`; `RUST_LOG` wins when set.
    #[serde(default = "default_log_level")]
    pub level: String,
    /// `text` or `json`. Default `text`.
    #[serde(default = "default_log_format")]
    pub format: String,
    /// One line per request at info (target `regcache::access`). Default true.
    #[serde(default = "yes")]
    pub access: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: default_log_level(),
            format: default_log_format(),
            access: true,
        }
    }
}

/// Docker Hub, the upstream used when none is configured.
pub const DOCKER_HUB_URL: &str = "https://registry-1.docker.io";

fn default_listen() -> String {
    "127.0.0.1:5000".into()
}
fn default_data_dir() -> PathBuf {
    PathBuf::from("./regcache-data")
}
fn default_shutdown_grace() -> Duration {
    Duration::from_secs(30)
}
/// nginx's `client_header_timeout` (60 s) halved: a real client sends its headers in one
/// packet, so anything slower is a stalled or hostile one holding a connection.
fn default_header_timeout() -> Duration {
    Duration::from_secs(30)
}
/// nginx's `keepalive_timeout`: below Go's `IdleConnTimeout` (90 s, containerd's and
/// Docker's clients), so a client pulling layer after layer keeps its connection, while
/// an abandoned one is closed within a minute and a quarter.
fn default_idle_timeout() -> Duration {
    Duration::from_secs(75)
}
/// nginx's `send_timeout`.
fn default_send_timeout() -> Duration {
    Duration::from_secs(60)
}
/// See README, "Connections": room for a large site's nodes with a few connections each,
/// at about two file descriptors and 13 KiB of memory per idle connection.
fn default_max_connections() -> usize {
    10_000
}
fn default_region() -> String {
    "us-east-1".into()
}
fn default_ttl() -> Duration {
    Duration::from_secs(7 * 86_400)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_read_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_revalidate_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_log_level() -> String {
    "info".into()
}
fn default_log_format() -> String {
    "text".into()
}
fn yes() -> bool {
    true
}
fn two() -> usize {
    2
}
fn default_max_attempts() -> u32 {
    5
}
fn default_job_retry_max() -> Duration {
    Duration::from_secs(600)
}
fn default_max_run_time() -> Duration {
    Duration::from_secs(60)
}
fn default_delete_batch() -> u32 {
    1000
}
fn default_stale_after() -> Duration {
    Duration::from_secs(600)
}
fn default_sweep_interval() -> Duration {
    Duration::from_secs(300)
}
fn default_regex_delete() -> String {
    ".*".into()
}
fn default_cadence() -> Duration {
    Duration::from_secs(86_400)
}
