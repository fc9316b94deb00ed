//! One client connection: HTTP/1.1 or HTTP/2 (h2c) through hyper's connection builder,
//! watched for the header, idle and send timeouts, and shut down gracefully on the shared
//! shutdown signal. Closing a connection drops its response bodies, and with them what
//! they hold (mapped blob windows, open files, eviction holds).

use super::activity::{Activity, Expired, Timeouts, TrackedBody, TrackedIo};
use crate::identity::ClientCert;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::task::Poll;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How a connection ended, for the caller's log.
#[derive(Debug)]
pub(crate) enum Ended {
    /// The client closed it, or it finished after a graceful shutdown.
    Done,
    /// hyper gave up on it (malformed request, reset, write error).
    Failed(Box<dyn std::error::Error + Send + Sync>),
    /// A timeout ran out; the connection was dropped.
    TimedOut(Expired),
}

/// Serves `io` until the client leaves, a timeout runs out, or shutdown is signalled
/// (then in-flight requests finish; the server's drain bounds how long that may take).
/// `peer`, the verified client certificate's identity, goes into every request's
/// extensions as an `Arc<ClientCert>`, and the client's address as axum's
/// `ConnectInfo<SocketAddr>` (`auth::client_addr`: failed logins are slowed per address,
/// the access log names it).
pub(crate) async fn serve<T>(
    io: T,
    app: Router,
    client: std::net::SocketAddr,
    peer: Option<Arc<ClientCert>>,
    timeouts: Timeouts,
    shutdown: CancellationToken,
) -> Ended
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Activity::new();
    let service = {
        let activity = activity.clone();
        hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
            let in_flight = activity.request_started();
            req.extensions_mut().insert(axum::extract::ConnectInfo(client));
            if let Some(peer) = &peer {
                req.extensions_mut().insert(peer.clone());
            }
            let app = app.clone();
            async move {
                let resp = tower::ServiceExt::oneshot(app, req.map(axum::body::Body::new)).await;
                Ok::<_, std::convert::Infallible>(match resp {
                    Ok(resp) => resp.map(|body| TrackedBody::new(body, in_flight)),
                    Err(never) => match never {},
                })
            }
        })
    };
    let builder = auto::Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection(TokioIo::new(TrackedIo::new(io, activity.clone())), service);
    watch(conn, &activity, timeouts, shutdown).await
}

/// Drives `conn` while checking the deadlines `activity` gives; one timer per
/// connection, moved only when the earliest deadline changes.
async fn watch<C, E>(
    conn: C,
    activity: &Arc<Activity>,
    timeouts: Timeouts,
    shutdown: CancellationToken,
) -> Ended
where
    C: Future<Output = Result<(), E>> + GracefulShutdown,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut conn = pin!(conn);
    let mut cancelled = pin!(shutdown.cancelled_owned());
    let mut draining = false;
    let mut timer = pin!(tokio::time::sleep_until(far_future()));
    let mut armed = false;
    std::future::poll_fn(|cx| {
        activity.register_watchdog(cx.waker());
        if !draining && cancelled.as_mut().poll(cx).is_ready() {
            draining = true;
            conn.as_mut().shut_down_gracefully();
        }
        if let Poll::Ready(r) = conn.as_mut().poll(cx) {
            return Poll::Ready(match r {
                Ok(()) => Ended::Done,
                Err(e) => Ended::Failed(e.into()),
            });
        }
        loop {
            let Some((at, why)) = activity.deadline(&timeouts) else {
                if armed {
                    timer.as_mut().reset(far_future());
                    armed = false;
                }
                return Poll::Pending;
            };
            if at <= Instant::now() {
                return Poll::Ready(Ended::TimedOut(why));
            }
            if !armed || timer.deadline() != at {
                timer.as_mut().reset(at);
                armed = true;
            }
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
    })
    .await
}

/// A timer that never fires in practice (a year on), for "nothing timed right now".
fn far_future() -> Instant {
    Instant::now() + std::time::Duration::from_secs(365 * 86_400)
}

/// hyper's connections have `graceful_shutdown` as an inherent method; this lets
/// `watch` call it on whatever connection type the builder returns.
trait GracefulShutdown {
    fn shut_down_gracefully(self: std::pin::Pin<&mut Self>);
}

impl<I, S, E> GracefulShutdown for auto::Connection<'_, I, S, E>
where
    S: hyper::service::HttpService<Incoming>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::ResBody: http_body::Body + Send + 'static,
    <S::ResBody as http_body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, S::ResBody>,
{
    fn shut_down_gracefully(self: std::pin::Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}
