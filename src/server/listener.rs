//! A listener's accept loop (registry and admin alike): binds before anything else starts,
//! caps open connections (refusing the rest at once instead of queueing them), does the
//! TLS handshake when `[server.tls]` is set, hands each connection to `connection.rs` with
//! the configured timeouts, and on shutdown stops accepting and waits for its connections
//! to finish.

use super::activity::{Expired, Timeouts};
use super::connection::{self, Ended};
use super::tls::Tls;
use super::ServerError;
use crate::config::ServerConfig;
use crate::identity::ClientCert;
use axum::Router;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Pause after an accept error that is about the process, not the peer (out of file
/// descriptors or memory): accepting again at once would spin on the same error. Short,
/// because connections closing free descriptors within milliseconds.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);
/// At most one warning per this long about refused connections or accept errors: a flood
/// must not turn into a flood of log lines.
const WARN_EVERY: Duration = Duration::from_secs(10);
/// File descriptors a connection may use: its socket and the blob file it is streaming.
const FDS_PER_CONNECTION: u64 = 2;
/// Descriptors kept for everything else: SQLite (database, WAL, shared memory per
/// connection), temporary files of transfers, upstream connections, the listeners.
const FDS_RESERVED: u64 = 512;

/// What a refused connection is told before it is closed. A new socket's send buffer is
/// empty, so this goes out in one non-blocking write; the OCI error body says why.
const REFUSAL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
content-type: application/json\r\n\
retry-after: 1\r\n\
connection: close\r\n\
docker-distribution-api-version: registry/2.0\r\n\
content-length: 93\r\n\
\r\n\
{\"errors\":[{\"code\":\"UNAVAILABLE\",\"message\":\"too many open connections, retry in a moment\"}]}\n";

/// Timeouts and the connection cap of one listener.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) timeouts: Timeouts,
    pub(crate) max_connections: usize,
}

impl Limits {
    pub(crate) fn from_config(server: &ServerConfig) -> Self {
        Self {
            timeouts: Timeouts {
                header: server.header_timeout.to_std(),
                idle: server.idle_timeout.to_std(),
                send: server.send_timeout.to_std(),
            },
            max_connections: server.max_connections,
        }
    }
}

/// Open connections of one listener.
#[derive(Debug, Clone)]
pub(crate) struct OpenConnections {
    permits: Arc<Semaphore>,
    max: usize,
}

impl OpenConnections {
    pub(crate) fn count(&self) -> usize {
        self.max - self.permits.available_permits()
    }
}

/// A listener ready to serve: its cap counter exists before the loop starts, so the
/// server can report open connections from the first one on.
#[derive(Debug)]
pub(crate) struct Serving {
    listener: TcpListener,
    key: &'static str,
    addr: std::net::SocketAddr,
    limits: Limits,
    open: OpenConnections,
    tls: Option<Arc<Tls>>,
}

impl Serving {
    /// Binds `addr`, the value of config key `key`.
    /// Binds `addr` when the optional listener `key` is configured.
    pub(crate) async fn bind_if_set(
        key: &'static str,
        addr: Option<&str>,
        limits: Limits,
    ) -> Result<Option<Self>, ServerError> {
        match addr {
            Some(addr) => Self::bind(key, addr, limits).await.map(Some),
            None => Ok(None),
        }
    }

    pub(crate) async fn bind(key: &'static str, addr: &str, limits: Limits) -> Result<Self, ServerError> {
        let failed = |source| ServerError::Bind {
            key,
            addr: addr.to_owned(),
            source,
        };
        let listener = TcpListener::bind(addr).await.map_err(failed)?;
        let local = listener.local_addr().map_err(failed)?;
        let open = OpenConnections {
            permits: Arc::new(Semaphore::new(limits.max_connections)),
            max: limits.max_connections,
        };
        Ok(Self {
            listener,
            key,
            addr: local,
            limits,
            open,
            tls: None,
        })
    }

    /// Speaks TLS with `tls`'s current configuration on every new connection.
    pub(crate) fn with_tls(mut self, tls: Option<Arc<Tls>>) -> Self {
        self.tls = tls;
        self
    }

    pub(crate) fn local_addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    pub(crate) fn open_connections(&self) -> OpenConnections {
        self.open.clone()
    }

    /// Accepts until `shutdown`, then waits for the open connections to end (each shuts
    /// down gracefully; `RunningServer::stop` bounds the wait).
    pub(crate) async fn run(self, app: Router, shutdown: CancellationToken) {
        let Serving {
            listener,
            key,
            limits,
            open,
            tls,
            ..
        } = self;
        let connections = TaskTracker::new();
        let mut refused = Throttled::default();
        let mut accept_errors = Throttled::default();
        loop {
            let accepted = tokio::select! {
                () = shutdown.cancelled() => break,
                accepted = listener.accept() => accepted,
            };
            let (stream, client) = match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    if accept_errors.tick() {
                        tracing::warn!(listener = key, error = %e, errors = accept_errors.take(), "accepting connections failed");
                    }
                    if is_resource_error(&e) {
                        tokio::select! {
                            () = shutdown.cancelled() => break,
                            () = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => {}
                        }
                    }
                    continue;
                }
            };
            let Ok(permit) = open.permits.clone().try_acquire_owned() else {
                // A TLS client would read a plain-text answer as garbage: it is only closed.
                if tls.is_none() {
                    refuse(stream);
                }
                if refused.tick() {
                    tracing::warn!(
                        listener = key,
                        connections.max = limits.max_connections,
                        connections.refused = refused.take(),
                        "connection cap reached: refusing new connections (server.max_connections)"
                    );
                }
                continue;
            };
            let (app, shutdown, tls) = (app.clone(), shutdown.clone(), tls.clone());
            connections.spawn(async move {
                let ended = match tls {
                    None => connection::serve(stream, app, client, None, limits.timeouts, shutdown).await,
                    Some(tls) => serve_tls(stream, client, &tls, app, limits, shutdown).await,
                };
                drop(permit);
                match ended {
                    Ended::Done => {}
                    Ended::Failed(e) => tracing::debug!(listener = key, error = %e, "connection failed"),
                    Ended::TimedOut(why) => {
                        tracing::debug!(listener = key, reason = why.as_str(), "connection closed")
                    }
                }
            });
        }
        drop(listener);
        connections.close();
        connections.wait().await;
    }
}

/// The TLS handshake (bounded by the header timeout, so a client that stalls in it is
/// closed like one that stalls in its headers), then the connection with the verified
/// client certificate's identity.
async fn serve_tls(
    stream: TcpStream,
    client: std::net::SocketAddr,
    tls: &Tls,
    app: Router,
    limits: Limits,
    shutdown: CancellationToken,
) -> Ended {
    let handshake = tokio::time::timeout(limits.timeouts.header, tls.acceptor().accept(stream)).await;
    let stream = match handshake {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return Ended::Failed(Box::new(e)),
        Err(_) => return Ended::TimedOut(Expired::Header),
    };
    let peer = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(|leaf| ClientCert::from_der(leaf))
        .map(Arc::new);
    connection::serve(stream, app, client, peer, limits.timeouts, shutdown).await
}

/// Answers 503 if the socket takes it at once, then closes: the client learns at once
/// instead of waiting in a queue, and nothing is spawned or awaited for it.
fn refuse(stream: TcpStream) {
    let _ = stream.try_write(REFUSAL);
}

/// Errors that say the process is short of something (retry after a pause), as opposed
/// to a connection that failed between the kernel's accept and ours (skip it).
fn is_resource_error(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(code) if code == libc::EMFILE || code == libc::ENFILE
            || code == libc::ENOBUFS || code == libc::ENOMEM
    )
}

/// Counts events and says when to log them: the first at once, then one line per
/// `WARN_EVERY` with the count since the last line.
#[derive(Debug, Default)]
struct Throttled {
    count: u64,
    last: Option<tokio::time::Instant>,
}

impl Throttled {
    fn tick(&mut self) -> bool {
        self.count += 1;
        let now = tokio::time::Instant::now();
        if self.last.is_some_and(|l| now < l + WARN_EVERY) {
            return false;
        }
        self.last = Some(now);
        true
    }

    fn take(&mut self) -> u64 {
        std::mem::take(&mut self.count)
    }
}

/// Raises the soft open-file limit to the hard limit (the common soft default, 1024,
/// is below a few hundred connections' needs) and warns when `max_connections` could
/// still use more descriptors than the limit allows: past it, accepts fail instead of
/// being refused with a 503.
pub(crate) fn raise_fd_limit(max_connections: usize) {
    let needed = (max_connections as u64)
        .saturating_mul(FDS_PER_CONNECTION)
        .saturating_add(FDS_RESERVED);
    match fd_limit::raise() {
        Ok(limit) if limit < needed => tracing::warn!(
            fds.limit = limit,
            fds.needed = needed,
            connections.max = max_connections,
            "the open-file limit is below what server.max_connections may need; \
             lower server.max_connections or raise the hard limit (ulimit -Hn, LimitNOFILE=)"
        ),
        Ok(limit) => tracing::debug!(fds.limit = limit, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "could not read or raise the open-file limit"),
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod fd_limit {
    /// Sets the soft RLIMIT_NOFILE to the hard one; returns the limit now in force.
    pub(super) fn raise() -> std::io::Result<u64> {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into the struct we own; no other memory is touched.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            // SAFETY: setrlimit reads the struct we own.
            if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            lim = raised;
        }
        Ok(lim.rlim_cur)
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
mod fd_limit {
    /// Elsewhere the limit is left as the operator set it.
    pub(super) fn raise() -> std::io::Result<u64> {
        Err(std::io::Error::other("not supported on this platform"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_refusal_is_a_well_formed_response() {
        let text = std::str::from_utf8(REFUSAL).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(length, body.len());
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["errors"][0]["code"], "UNAVAILABLE");
    }
}
