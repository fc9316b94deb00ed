//! Assembling and running the server: binds the listeners, opens metadata and storage,
//! builds the upstream clients and the cache, and stops everything on one shutdown signal
//! with a bounded drain.

mod activity;
mod connection;
mod listener;
mod lock;
mod tls;

pub use lock::{DataDirLock, LockError};
pub use tls::TlsReloads;

use crate::auth::{Access, AuthError};
use crate::cache::{ActiveBlobs, Cache, CacheParts, CacheSettings, UseBuffer};
use crate::config::Config;
use crate::metadata::{now_secs, AppliedSettings, Metadata, MetadataError};
use crate::scheduler::{JobSettings, Scheduler, SchedulerSettings};
use crate::storage::StorageError;
use crate::upstream::{UpstreamError, Upstreams};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("data directory {path}: {source}")]
    DataDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Locked(#[from] LockError),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Metadata(#[from] MetadataError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error(
        "{key} = {addr:?}: cannot listen there: {source}; stop what holds the address or set another in {key}"
    )]
    Bind {
        /// The config key naming the address.
        key: &'static str,
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{key}: {message}")]
    Tls { key: &'static str, message: String },
    #[error("server task failed: {0}")]
    Task(String),
    #[error("config key `prefetch[{index}].list`: {source}")]
    PrefetchList {
        index: usize,
        #[source]
        source: crate::imagelist::ImageListError,
    },
}

/// A started server. Dropping it does not stop it; call [`RunningServer::stop`].
#[derive(Debug)]
pub struct RunningServer {
    addr: SocketAddr,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    http: JoinHandle<()>,
    grace: std::time::Duration,
    cache: Arc<Cache>,
    connections: listener::OpenConnections,
    tls: Option<Arc<tls::Tls>>,
    access: Arc<Access>,
    /// Held until the server is stopped or dropped.
    _lock: DataDirLock,
}

/// Opens everything `config` names and starts serving.
pub async fn start(config: Config) -> Result<RunningServer, ServerError> {
    start_with_store(config, None).await
}

/// Like [`start`], with blobs in `store` instead of the configured backend (tests use a
/// store that fails on command).
pub async fn start_with_store(
    config: Config,
    store: Option<crate::storage::BlobStore>,
) -> Result<RunningServer, ServerError> {
    // The identity files first: a bad one stops the start before anything is touched.
    let access = Access::load(&config).await?;
    // Prefetch lists are read again when their jobs run; a bad one is refused up front.
    for (index, p) in config.prefetch.iter().enumerate() {
        crate::imagelist::load(&p.list).map_err(|source| ServerError::PrefetchList { index, source })?;
    }
    // Then the listeners: a port in use must fail before the database is created or changed.
    let limits = listener::Limits::from_config(&config.server);
    let registry_listener = listener::Serving::bind("server.listen", &config.server.listen, limits).await?;
    let admin_listener =
        listener::Serving::bind_if_set("admin.listen", config.admin.listen.as_deref(), limits).await?;
    let metrics_addr = config
        .metrics
        .listen
        .as_deref()
        .filter(|_| config.metrics.enabled);
    let metrics_listener = listener::Serving::bind_if_set("metrics.listen", metrics_addr, limits).await?;
    let listeners = 1 + usize::from(admin_listener.is_some()) + usize::from(metrics_listener.is_some());
    listener::raise_fd_limit(limits.max_connections * listeners);
    let tls = match &config.server.tls {
        Some(settings) => Some(tls::Tls::load(settings).await?),
        None => None,
    };
    let registry_listener = registry_listener.with_tls(tls.clone());
    let admin_listener = admin_listener.map(|l| l.with_tls(tls.clone()));
    let data_dir = config.server.data_dir.clone();
    std::fs::create_dir_all(&data_dir).map_err(|source| ServerError::DataDir {
        path: data_dir.display().to_string(),
        source,
    })?;
    // Before anything that would disturb another server on this directory.
    let lock = DataDirLock::acquire(&data_dir)?;
    let db_path = data_dir.join("regcache.db");
    let meta = tokio::task::spawn_blocking(move || Metadata::open(&db_path))
        .await
        .map_err(|e| ServerError::Task(e.to_string()))??;
    let store = match store {
        Some(s) => s,
        None => crate::storage::build(&config.storage, &data_dir)?,
    };
    let upstreams = Upstreams::from_config(&config)?;
    let jobs_due: Arc<tokio::sync::Notify> = Arc::default();
    let admin = crate::admin::router(crate::admin::AdminState {
        meta: meta.clone(),
        upstreams: upstreams.clone(),
        access: access.clone(),
        max_attempts: i64::from(config.jobs.max_attempts),
        jobs_due: jobs_due.clone(),
    });
    apply_settings(&meta, &config).await?;
    claim_storage_prefix(&meta, &store, &data_dir).await?;
    let shutdown = CancellationToken::new();
    let tasks = TaskTracker::new();
    let tmp_dir = data_dir.join("tmp");
    let active = Arc::new(ActiveBlobs::default());
    let uses = Arc::new(UseBuffer::default());
    let disk = Arc::new(crate::storage::DataDisk::open(&data_dir));
    let cache = Cache::new(CacheParts {
        meta: meta.clone(),
        store: store.clone(),
        upstreams,
        tmp_dir: tmp_dir.clone(),
        settings: CacheSettings::from_config(&config),
        active: active.clone(),
        uses: uses.clone(),
        disk,
        tasks: tasks.clone(),
        shutdown: shutdown.clone(),
    })
    .map_err(|source| ServerError::DataDir {
        path: tmp_dir.display().to_string(),
        source,
    })?;
    let addr = registry_listener.local_addr();
    tasks.spawn(cache.clone().run_background());
    tasks.spawn(access.clone().watch_files(shutdown.clone()));
    if let Some(tls) = &tls {
        tasks.spawn(tls.clone().watch(shutdown.clone()));
    }
    let scheduler = Scheduler {
        meta,
        store,
        settings: SchedulerSettings::from_config(&config),
        tmp_dir: Some(tmp_dir),
        active,
        deletes_due: Arc::default(),
        jobs: JobSettings::from_config(&config),
        jobs_due,
        uses: Some(uses),
        shutdown: shutdown.clone(),
    };
    crate::prefetch::spawn_jobs(&scheduler, cache.clone(), config.prefetch.clone(), &tasks);
    scheduler.spawn(&tasks);
    let observer = crate::metrics::Observer::new(&config, cache.clone(), access.clone());
    let registry = crate::registry::router(cache.clone(), access.clone()).merge(observer.registry_routes());
    let app = match admin_listener {
        None => registry.merge(admin),
        Some(admin_listener) => {
            let admin = observer.layer(admin.merge(observer.admin_routes()));
            tasks.spawn(admin_listener.run(admin, shutdown.clone()));
            registry
        }
    };
    if let Some(metrics_listener) = metrics_listener {
        tasks.spawn(metrics_listener.run(observer.metrics_app(), shutdown.clone()));
    }
    let app = observer.layer(app);
    let connections = registry_listener.open_connections();
    let http = tokio::spawn(registry_listener.run(app, shutdown.clone()));
    tracing::info!(
        listen.addr = %addr,
        data.dir = %data_dir.display(),
        storage = cache.store().describe(),
        upstreams = %config.upstream.iter().map(|u| format!("{}={}{}", u.name, u.url, if u.default { " (default)" } else { "" })).collect::<Vec<_>>().join(", "),
        offline = config.proxy.offline,
        "regcache listening"
    );
    warn_if_credentials_exposed(&access, &config, addr);
    Ok(RunningServer {
        addr,
        shutdown,
        tasks,
        http,
        grace: config.server.shutdown_grace.to_std(),
        cache,
        connections,
        tls,
        access,
        _lock: lock,
    })
}

/// Says once, at start-up, when anonymous clients on other machines can pull through an
/// upstream's credentials (its private images, its account's rate limit).
fn warn_if_credentials_exposed(access: &Access, config: &Config, addr: SocketAddr) {
    if addr.ip().is_loopback() {
        return;
    }
    // Required client certificates already keep out whoever holds none.
    let certificates_required = config.server.tls.as_ref().is_some_and(|t| {
        t.client_ca_file.is_some() && t.client_auth != Some(crate::config::ClientAuth::Optional)
    });
    if certificates_required {
        return;
    }
    let exposed = access.anonymous_upstreams_with_credentials(config);
    if exposed.is_empty() {
        return;
    }
    tracing::warn!(
        listen.addr = %addr,
        upstreams = %exposed.join(", "),
        "anonymous clients on other machines can pull through upstreams that have credentials \
         (their private images, their account's rate limit). To fix it, configure [auth] with \
         htpasswd_file or token_files and [[auth.rule]] entries (anonymous pulls are then off \
         unless a rule with anonymous = true allows them; leave these upstreams out of it), \
         or listen on 127.0.0.1"
    );
}

/// The ttl of each upstream, as applied to stored state.
pub fn applied_settings(config: &Config) -> AppliedSettings {
    AppliedSettings {
        ttls: config
            .upstream
            .iter()
            .map(|u| {
                let ttl = u.ttl.unwrap_or(config.proxy.ttl);
                (u.name.clone(), i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX))
            })
            .collect(),
        delete_enabled: config.storage.delete.enabled,
    }
}

/// I6: rewrites the stored schedule when ttl or `storage.delete.enabled` changed since
/// they were last applied, and takes back what a previous process left half done.
async fn apply_settings(meta: &Metadata, config: &Config) -> Result<(), ServerError> {
    let change = meta.apply_settings(applied_settings(config), now_secs()).await?;
    if !change.is_empty() {
        tracing::info!(change = %change, "applied changed settings to the stored schedule");
    }
    let reclaimed = meta.reset_after_restart().await?;
    if reclaimed > 0 {
        tracing::info!(
            deletes.reclaimed = reclaimed,
            "took back deletes claimed by a previous process"
        );
    }
    Ok(())
}

/// Marks a shared store's prefix (S3, GCS) as this instance's, or says at start-up that
/// another instance (another data directory) has it; reconciliation then deletes nothing
/// there. A store that cannot be reached is reported and looked at again by every
/// reconciliation pass.
async fn claim_storage_prefix(
    meta: &Metadata,
    store: &crate::storage::BlobStore,
    data_dir: &std::path::Path,
) -> Result<(), ServerError> {
    let instance = meta.instance_id(now_secs()).await?;
    match store
        .claim_prefix(&instance, &data_dir.display().to_string(), now_secs())
        .await
    {
        Ok(crate::storage::PrefixOwner::Other {
            instance: owner,
            data_dir: owner_dir,
        }) => tracing::error!(
            instance.id = %instance,
            owner.instance = %owner,
            owner.data_dir = %owner_dir,
            storage = store.describe(),
            "the storage prefix belongs to another regcache instance (another data directory); reconciliation will delete nothing there. Give each instance its own storage.s3.prefix (or storage.gcs.prefix)"
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!(
            error = %e,
            "could not read or write the storage owner marker; reconciliation deletes no orphans until it can"
        ),
    }
    Ok(())
}

impl RunningServer {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn cache(&self) -> &Arc<Cache> {
        &self.cache
    }

    /// What reloading the TLS files did so far; `None` without `[server.tls]`.
    pub fn tls_reloads(&self) -> Option<TlsReloads> {
        self.tls.as_ref().map(|t| t.reloads())
    }

    /// Client connections open on the registry listener.
    pub fn open_connections(&self) -> usize {
        self.connections.count()
    }

    pub fn access(&self) -> &Arc<Access> {
        &self.access
    }

    /// Stops accepting, lets requests and background work finish within the grace
    /// period, then returns.
    pub async fn stop(self) -> Result<(), ServerError> {
        self.shutdown.cancel();
        self.tasks.close();
        let drained = tokio::time::timeout(self.grace, async {
            let http = self.http.await;
            self.tasks.wait().await;
            http
        })
        .await;
        match drained {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(ServerError::Task(e.to_string())),
            Err(_) => {
                tracing::warn!(
                    grace_ms = self.grace.as_millis() as u64,
                    "shutdown grace period passed; exiting"
                );
                Ok(())
            }
        }
    }
}
