//! The HTTP connection layer: accepts TCP (and TLS) connections, serves each with hyper's
//! HTTP/1.1 server over the router, and bounds what a connection may hold (`docs/limits.md`).
//!
//! - At most [`HttpLimits::max_connections`] connections are open at once, counting TLS
//!   handshakes under way and upgraded WebSocket sessions. A connection past the limit evicts
//!   the open connection that has been waiting longest without a request in progress (a
//!   half-open flood is made of exactly those, while a legitimate client sends its request at
//!   once); when every open connection is busy, the new one is closed at once.
//! - A response the client stops reading for [`HttpLimits::idle_timeout`] (its writes wait
//!   that long; it is noticed within half as long again) closes the connection.
//! - A connection must deliver a request's complete head within
//!   [`HttpLimits::header_read_timeout`] of its first byte (of the connection's opening, for
//!   the first request), and an idle keep-alive connection is closed after
//!   [`HttpLimits::idle_timeout`]. Both close the connection without an answer: there is no
//!   request to answer yet.
//! - The request body's deadline and size are the router's (`routes::body`), which can answer
//!   with 408 and 413.
//!
//! Each connection is one task with its own watchdog; the accept loop never waits on a client.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tower::ServiceExt;

use crate::tls::{TlsConfig, handshake};

/// File descriptors kept back from connections for databases, the accounts file and logs,
/// when the process's descriptor limit lowers [`HttpLimits::max_connections`].
const DESCRIPTOR_RESERVE: usize = 256;

/// What one connection may hold, and how many there may be.
#[derive(Clone, Debug)]
pub(crate) struct HttpLimits {
    /// The most connections open at once (including TLS handshakes and WebSocket sessions).
    pub(crate) max_connections: usize,
    /// How long a request's head (request line and headers) may take to arrive.
    pub(crate) header_read_timeout: Duration,
    /// How long a keep-alive connection may wait for its next request.
    pub(crate) idle_timeout: Duration,
    /// The largest request head (request line and headers), and so hyper's read buffer.
    pub(crate) max_header_bytes: usize,
}

/// The open connections.
#[derive(Default)]
struct Registry {
    open: Mutex<Open>,
    next_id: AtomicU64,
}

#[derive(Default)]
struct Open {
    connections: HashMap<u64, Arc<Connection>>,
    /// Those told to close for a newer one, which still count until they have.
    evicting: usize,
}

/// What the layer knows of one open connection.
pub(crate) struct Connection {
    id: u64,
    activity: Mutex<Activity>,
    /// Told to close the connection now (eviction).
    evict: Notify,
    /// Told when the watchdog's deadline may have changed: a request starts (the deadline goes,
    /// and the watchdog looks at blocked writes instead), a head starts arriving, a write
    /// blocks, a response is done.
    deadline_moved: Notify,
}

struct Activity {
    /// Requests dispatched whose responses have not been written completely.
    in_flight: usize,
    /// Requests dispatched so far.
    requests: u64,
    /// When the connection was ready for a request, or its last response was written.
    idle_since: Instant,
    /// When the first byte of a request head arrived, while no request was in flight.
    head_started: Option<Instant>,
    /// Whether hyper is done with the connection: a WebSocket session owns it now, and only
    /// the session's own deadlines end it.
    upgraded: bool,
    /// Chosen for eviction already.
    evicting: bool,
    /// Since when a write to the client has been waiting (the client does not read).
    write_blocked_since: Option<Instant>,
    /// A cap on bytes read from now on (a WebSocket session before authentication), and the
    /// bytes read since it was set.
    read_budget: Option<(u64, u64)>,
}

/// A handle on the connection a request arrived on (a request extension).
#[derive(Clone)]
pub(crate) struct ConnectionHandle(Arc<Connection>);

impl ConnectionHandle {
    /// Caps the bytes read from the connection from now on at `bytes` (`None`: no cap); a
    /// read past it fails with [`BudgetExceeded`].
    pub(crate) fn limit_reads(&self, bytes: Option<usize>) {
        let mut activity = self.0.lock();
        activity.read_budget = bytes.map(|bytes| (u64::try_from(bytes).unwrap_or(u64::MAX), 0));
    }
}

/// The error a read past [`ConnectionHandle::limit_reads`] fails with.
#[derive(Debug, thiserror::Error)]
#[error("the connection sent more than its {0} bytes before authentication")]
pub(crate) struct BudgetExceeded(pub(crate) u64);

impl Connection {
    fn lock(&self) -> std::sync::MutexGuard<'_, Activity> {
        self.activity
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// When the watchdog closes the connection unless something happens first (`None`: a
    /// request is in progress, whose body deadline is the router's, and its response is not
    /// stuck).
    fn deadline(&self, limits: &HttpLimits) -> Option<Instant> {
        let activity = self.lock();
        // A response the client stopped reading holds the connection no longer than an idle
        // one. (hyper may hold a whole response after its body is done, so this comes before
        // the request count: a response still being written is not idle.)
        if let Some(since) = activity.write_blocked_since {
            return Some(since + limits.idle_timeout);
        }
        if activity.in_flight > 0 {
            return None;
        }
        Some(match activity.head_started {
            Some(started) => started + limits.header_read_timeout,
            None if activity.requests == 0 => activity.idle_since + limits.header_read_timeout,
            None => activity.idle_since + limits.idle_timeout,
        })
    }
}

/// An open connection's place in the registry, released when the connection's socket is
/// dropped (by hyper, or by the WebSocket session it was upgraded to).
struct Slot {
    registry: Arc<Registry>,
    connection: Arc<Connection>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self
            .registry
            .open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        open.connections.remove(&self.connection.id);
        if self.connection.lock().evicting {
            open.evicting -= 1;
        }
    }
}

impl Registry {
    /// A slot for a new connection, evicting the longest-waiting idle one when full; `None`
    /// when every open connection is busy.
    fn admit(self: &Arc<Registry>, max: usize) -> Option<Slot> {
        let mut open = self
            .open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if open.connections.len() - open.evicting >= max {
            let victim = open
                .connections
                .values()
                .filter_map(|connection| {
                    let activity = connection.lock();
                    (activity.in_flight == 0 && !activity.upgraded && !activity.evicting)
                        .then_some((activity.idle_since, connection))
                })
                .min_by_key(|(since, _)| *since)
                .map(|(_, connection)| connection.clone())?;
            victim.lock().evicting = true;
            victim.evict.notify_one();
            open.evicting += 1;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let connection = Arc::new(Connection {
            id,
            activity: Mutex::new(Activity {
                in_flight: 0,
                requests: 0,
                idle_since: Instant::now(),
                head_started: None,
                upgraded: false,
                evicting: false,
                write_blocked_since: None,
                read_budget: None,
            }),
            evict: Notify::new(),
            deadline_moved: Notify::new(),
        });
        open.connections.insert(id, connection.clone());
        Some(Slot {
            registry: self.clone(),
            connection,
        })
    }
}

/// A connection's stream, recording what passes for the watchdog and holding its slot.
struct Tracked<I> {
    io: I,
    slot: Slot,
}

impl<I: AsyncRead + Unpin> AsyncRead for Tracked<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut this.io).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        if read > 0 {
            let mut activity = this.slot.connection.lock();
            if activity.in_flight == 0 && activity.head_started.is_none() {
                activity.head_started = Some(Instant::now());
                this.slot.connection.deadline_moved.notify_one();
            }
            if let Some((budget, used)) = &mut activity.read_budget {
                *used += read as u64;
                if *used > *budget {
                    return Poll::Ready(Err(io::Error::other(BudgetExceeded(*budget))));
                }
            }
        }
        result
    }
}

impl<I> Tracked<I> {
    /// Records a write: waiting on the client, or bytes gone out. Only bytes written count as
    /// activity: hyper also polls for nothing (a flush with nothing to flush, whenever its
    /// connection is polled), which must not keep an idle connection alive.
    fn wrote(&self, poll: Poll<io::Result<usize>>) -> Poll<io::Result<usize>> {
        let mut activity = self.slot.connection.lock();
        match &poll {
            Poll::Pending => self.write_blocked(&mut activity),
            Poll::Ready(written) => {
                activity.write_blocked_since = None;
                // Idle counts from the last byte written, not from when the body was done.
                if activity.in_flight == 0 && written.as_ref().is_ok_and(|n| *n > 0) {
                    activity.idle_since = Instant::now();
                }
            }
        }
        poll
    }

    /// Records a flush: waiting on the client (TLS records), or done.
    fn flushed(&self, poll: Poll<io::Result<()>>) -> Poll<io::Result<()>> {
        let mut activity = self.slot.connection.lock();
        match &poll {
            Poll::Pending => self.write_blocked(&mut activity),
            Poll::Ready(_) => activity.write_blocked_since = None,
        }
        poll
    }

    /// A write waits on the client: from now, the watchdog's deadline counts from here.
    fn write_blocked(&self, activity: &mut Activity) {
        if activity.write_blocked_since.is_none() {
            activity.write_blocked_since = Some(Instant::now());
            self.slot.connection.deadline_moved.notify_one();
        }
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Tracked<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.io).poll_write(cx, buf);
        this.wrote(poll)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.io).poll_flush(cx);
        this.flushed(poll)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.wrote(poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Counts a request as in flight until its response body is dropped (written or abandoned).
struct InFlight(Arc<Connection>);

impl InFlight {
    fn start(connection: Arc<Connection>) -> InFlight {
        {
            let mut activity = connection.lock();
            activity.in_flight += 1;
            activity.requests += 1;
            activity.head_started = None;
        }
        connection.deadline_moved.notify_one();
        InFlight(connection)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut activity = self.0.lock();
        activity.in_flight -= 1;
        if activity.in_flight == 0 {
            activity.idle_since = Instant::now();
            self.0.deadline_moved.notify_one();
        }
    }
}

/// A response body that keeps its request in flight.
struct Guarded {
    body: Body,
    _in_flight: InFlight,
}

impl hyper::body::Body for Guarded {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// `configured`, lowered to what the process's file descriptor limit leaves room for.
fn effective_max_connections(configured: usize) -> usize {
    let Some(descriptors) = open_files_limit() else {
        return configured;
    };
    let room = descriptors.saturating_sub(DESCRIPTOR_RESERVE).max(16);
    if room < configured {
        tracing::info!(
            configured,
            open_files_limit = descriptors,
            serving = room,
            "--max-connections lowered to what the open files limit (ulimit -n) leaves room \
             for"
        );
        return room;
    }
    configured
}

/// The soft limit on open files, where the system says (Linux).
fn open_files_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Serves `router` on `listener` until `shutdown` completes, then lets requests in progress
/// finish (sessions already upgraded are not waited for).
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    limits: HttpLimits,
    tls: Option<TlsConfig>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let limits = Arc::new(HttpLimits {
        max_connections: effective_max_connections(limits.max_connections),
        ..limits
    });
    let registry = Arc::new(Registry::default());
    let (stop, stopping) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, address) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) if is_connection_error(&error) => continue,
                Err(error) => {
                    // Out of descriptors or memory: wait for connections to close.
                    tracing::error!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
        };
        let Some(slot) = registry.admit(limits.max_connections) else {
            tracing::debug!(%address, "connection limit reached; connection closed");
            drop(stream);
            continue;
        };
        // Sync sessions exchange small frames; Nagle's algorithm would delay each by up to
        // 40 ms.
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "could not set TCP_NODELAY");
        }
        tasks.spawn(connection(
            stream,
            address,
            slot,
            router.clone(),
            limits.clone(),
            tls.clone(),
            stopping.clone(),
        ));
    }
    drop(listener);
    let _ = stop.send(true);
    while tasks.join_next().await.is_some() {}
    Ok(())
}

fn is_connection_error(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// One connection, from its TLS handshake (when serving TLS) to its last response.
async fn connection(
    stream: TcpStream,
    address: SocketAddr,
    slot: Slot,
    router: Router,
    limits: Arc<HttpLimits>,
    tls: Option<TlsConfig>,
    stopping: watch::Receiver<bool>,
) {
    let connection = slot.connection.clone();
    match tls {
        None => serve_http(Tracked { io: stream, slot }, router, &limits, stopping).await,
        Some(tls) => {
            let handshake = handshake(tls.acceptor(), stream, address, tls.handshake_timeout);
            let stream = tokio::select! {
                stream = handshake => stream,
                () = connection.evict.notified() => None,
            };
            let Some((stream, _)) = stream else { return };
            connection.lock().idle_since = Instant::now();
            serve_http(Tracked { io: stream, slot }, router, &limits, stopping).await;
        }
    }
}

async fn serve_http<I>(
    io: Tracked<I>,
    router: Router,
    limits: &HttpLimits,
    mut stopping: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let connection = io.slot.connection.clone();
    let handle = ConnectionHandle(connection.clone());
    let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        let in_flight = InFlight::start(handle.0.clone());
        let mut request = request.map(Body::new);
        request.extensions_mut().insert(handle.clone());
        let router = router.clone();
        async move {
            let response = router.oneshot(request).await?;
            Ok::<_, Infallible>(response.map(|body| Guarded {
                body,
                _in_flight: in_flight,
            }))
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    // A larger head is answered 431 and the connection closed (hyper's floor is 8 KiB).
    builder.max_buf_size(limits.max_header_bytes.max(8192));
    let mut serving = std::pin::pin!(
        builder
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades()
    );
    let mut draining = false;
    loop {
        let deadline = connection.deadline(limits);
        // Without a deadline (a request in progress), look again at half the idle timeout:
        // a response whose writes stopped is closed within one and a half of it.
        let wake = deadline.unwrap_or_else(|| Instant::now() + limits.idle_timeout / 2);
        tokio::select! {
            result = serving.as_mut() => {
                if let Err(error) = result {
                    tracing::debug!(%error, "connection ended");
                }
                break;
            }
            () = connection.evict.notified() => {
                tracing::debug!("connection evicted for a new one");
                break;
            }
            () = connection.deadline_moved.notified() => {}
            () = tokio::time::sleep_until(wake) => {
                // The deadline may have moved meanwhile; only an expired one closes.
                if connection.deadline(limits).is_some_and(|at| at <= Instant::now()) {
                    tracing::debug!("connection timed out waiting for a request");
                    break;
                }
            }
            changed = stopping.changed(), if !draining => {
                draining = true;
                if changed.is_ok() {
                    serving.as_mut().graceful_shutdown();
                }
            }
        }
    }
    // Whatever took the socket over (a WebSocket session) is no longer hyper's to close.
    connection.lock().upgraded = true;
}
