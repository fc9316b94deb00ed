//! Assembling and running the server: opens metadata and storage, builds the upstream
//! clients and the cache, binds the listener, and stops everything on one shutdown signal
//! with a bounded drain.

use crate::cache::{Cache, CacheSettings};
use crate::config::Config;
use crate::metadata::{Metadata, MetadataError};
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
    Metadata(#[from] MetadataError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("server task failed: {0}")]
    Task(String),
}

/// A started server. Dropping it does not stop it; call [`RunningServer::stop`].
#[derive(Debug)]
pub struct RunningServer {
    addr: SocketAddr,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    http: JoinHandle<std::io::Result<()>>,
    grace: std::time::Duration,
    cache: Arc<Cache>,
}

/// Opens everything `config` names and starts serving.
pub async fn start(config: Config) -> Result<RunningServer, ServerError> {
    let data_dir = config.server.data_dir.clone();
    std::fs::create_dir_all(&data_dir).map_err(|source| ServerError::DataDir {
        path: data_dir.display().to_string(),
        source,
    })?;
    let db_path = data_dir.join("regcache.db");
    let meta = tokio::task::spawn_blocking(move || Metadata::open(&db_path))
        .await
        .map_err(|e| ServerError::Task(e.to_string()))??;
    let store = crate::storage::build(&config.storage, &data_dir)?;
    let upstreams = Upstreams::from_config(&config)?;
    let shutdown = CancellationToken::new();
    let tasks = TaskTracker::new();
    let tmp_dir = data_dir.join("tmp");
    let cache = Cache::new(
        meta,
        store,
        upstreams,
        tmp_dir.clone(),
        CacheSettings::from_config(&config),
        tasks.clone(),
        shutdown.clone(),
    )
    .map_err(|source| ServerError::DataDir {
        path: tmp_dir.display().to_string(),
        source,
    })?;
    let listener = tokio::net::TcpListener::bind(&config.server.listen)
        .await
        .map_err(|source| ServerError::Bind {
            addr: config.server.listen.clone(),
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| ServerError::Bind {
        addr: config.server.listen.clone(),
        source,
    })?;
    tasks.spawn(cache.clone().run_background());
    let app = crate::registry::router(cache.clone());
    let stop = shutdown.clone();
    let http = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await
    });
    tracing::info!(
        listen.addr = %addr,
        data.dir = %data_dir.display(),
        storage = cache.store().describe(),
        upstreams = %config.upstream.iter().map(|u| format!("{}={}{}", u.name, u.url, if u.default { " (default)" } else { "" })).collect::<Vec<_>>().join(", "),
        offline = config.proxy.offline,
        "regcache listening"
    );
    Ok(RunningServer {
        addr,
        shutdown,
        tasks,
        http,
        grace: config.server.shutdown_grace.to_std(),
        cache,
    })
}

impl RunningServer {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn cache(&self) -> &Arc<Cache> {
        &self.cache
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
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(e))) => Err(ServerError::Task(e.to_string())),
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
