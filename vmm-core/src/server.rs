//! Accepting connections and running them.
//!
//! Each connection runs in its own task with its own tracing span. A
//! semaphore caps open connections (lowered to fit the open-file limit, see
//! [`crate::descriptors`]): one more is answered `server_busy` and closed.
//! Shutdown is a signal that every connection waits on ([`crate::shutdown`]):
//! the accept loop stops, every connection finishes the request it is
//! executing (and those it has already received), and after
//! `shutdown_grace` whatever is left is aborted.
//!
//! With the PROXY protocol on ([`crate::proxy_protocol`]), a connection is
//! placed only once its header is read: the per-address limit and the
//! session's peer are the client's, from the header, not the balancer's.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::commands::ping;
use crate::connection::{Connection, Head, Incoming, SendError};
use crate::context::Context;
use crate::descriptors::{self, Spare, Throttle};
use crate::error::Error;
use crate::events::Event;
use crate::metrics::CommandSlot;
use crate::protocol::{ErrorCode, Reply, Request};
use crate::proxy_protocol::{self, Arrival, Rewound};
use crate::registry::{HandlerFuture, Registry};
use crate::session::{Lagged, Session};
use crate::shutdown::{Shutdown, Stop};
use crate::store::SetupError;

/// Serves `listener` until `shutdown` completes, then drains gracefully.
///
/// The context should come from [`Context::connect`], which has applied the
/// migrations. Fails at once if two linked commands share a name.
pub async fn serve(
    listener: TcpListener,
    context: Arc<Context>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), SetupError> {
    let registry = Registry::global().map_err(|err| SetupError(err.to_string()))?;
    // Before counting the open descriptors: it is one of them.
    let mut spare = Spare::open();
    let max_connections = descriptors::fit_connections(&context.config);
    let limit = Arc::new(Semaphore::new(max_connections));
    let refusals = Refusals::new(Arc::clone(&context));
    // Shared with the connections' tasks, which refuse too once they have
    // read a PROXY header; a task that does refuses, then ends, which wakes
    // this loop up to log what is due.
    let repeated = Arc::new(Mutex::new(Repeated::default()));
    let stop = Shutdown::new();
    let mut tasks = JoinSet::new();
    let per_ip = Arc::new(PerIp::default());
    let presence = crate::presence::maintain(Arc::clone(&context));
    let events = crate::listener::listen(Arc::clone(&context));
    let pruning = crate::retention::prune(Arc::clone(&context));
    let writer = crate::presence::write_behind(Arc::clone(&context));
    let audit = {
        let context = Arc::clone(&context);
        crate::task::AbortOnDrop::spawn(async move { context.audit_log.flush_every_second().await })
    };
    tokio::pin!(shutdown);

    loop {
        let log_due = lock(&repeated).due();
        tokio::select! {
            () = &mut shutdown => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            () = sleep_until(log_due), if log_due.is_some() => lock(&repeated).flush(),
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(err) if descriptors::exhausted(&err) => {
                        lock(&repeated).exhausted();
                        if !refuse_with_spare(&listener, &mut spare).await {
                            // No descriptor to be had at all: wait for one
                            // to be closed rather than spin.
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                        continue;
                    }
                    Err(err) if descriptors::out_of_memory(&err) => {
                        lock(&repeated).starved();
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                    Err(err) => {
                        // The client's own failure (it reset the connection
                        // while it waited): the next one may be fine.
                        tracing::debug!(error = %err, "accept failed");
                        continue;
                    }
                };
                configure(&stream, context.config.tcp_keepalive);
                let proxied = context.config.proxy_protocol.as_ref();
                let from_ip = match proxied {
                    // The address that counts is in the header, not read yet.
                    Some(proxy) if proxy.trusts(peer.ip()) => None,
                    Some(_) => {
                        // Dropped: closed without a reply.
                        tracing::debug!(%peer, "not a trusted balancer (--proxy-protocol-from), closing");
                        context.metrics.refused_proxy.inc();
                        lock(&repeated).proxy();
                        continue;
                    }
                    None => match per_ip.enter(peer.ip(), context.config.max_connections_per_ip) {
                        Some(from_ip) => Some(from_ip),
                        None => {
                            lock(&repeated).crowded();
                            context.metrics.refused_per_ip.inc();
                            refusals.refuse(&mut tasks, stream, peer, CROWDED);
                            continue;
                        }
                    },
                };
                match Arc::clone(&limit).try_acquire_owned() {
                    Ok(permit) => {
                        let span = tracing::info_span!(
                            "conn",
                            via = tracing::field::Empty,
                            peer = tracing::field::Empty,
                            session = tracing::field::Empty,
                        );
                        match proxied {
                            Some(_) => span.record("via", tracing::field::display(peer)),
                            None => span.record("peer", tracing::field::display(peer)),
                        };
                        // Boxed: the task keeps what it captures for its
                        // whole life, and this is needed only until the
                        // connection is placed.
                        let accepted = Box::new(Accepted {
                            stream,
                            peer,
                            from_ip,
                            per_ip: Arc::clone(&per_ip),
                            repeated: Arc::clone(&repeated),
                        });
                        let context = Arc::clone(&context);
                        let stop = stop.subscribe();
                        tasks.spawn(
                            async move {
                                let _connected = crate::metrics::Connected::new(&context.metrics);
                                // Boxed: none of its state (a TLS handshake's
                                // is large) is needed once the connection
                                // runs. And not given a name: the task would
                                // keep its room beside the parts taken out.
                                let Some((mut conn, mut session, from_ip)) =
                                    Box::pin(begin(accepted, &context)).await
                                else {
                                    return;
                                };
                                run(&mut conn, &context, registry, &mut session, &stop).await;
                                finish(&context, session);
                                drop((permit, from_ip));
                            }
                            .instrument(span),
                        );
                    }
                    Err(_) => {
                        lock(&repeated).busy();
                        context.metrics.refused_max_connections.inc();
                        refusals.refuse(&mut tasks, stream, peer, BUSY);
                    }
                }
            }
        }
    }

    drop(listener);
    stop.stop();
    let open = tasks.len();
    if open > 0 {
        tracing::info!(
            connections = open,
            "shutting down, waiting for requests in flight"
        );
    }
    let drain = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(context.config.shutdown_grace, drain)
        .await
        .is_err()
    {
        tracing::warn!(
            connections = tasks.len(),
            "requests still running after the grace period, aborting them"
        );
        tasks.shutdown().await;
    }
    drop(writer);
    drop(events);
    drop(pruning);
    drop(presence);
    drop(audit);
    context.audit_log.flush().await;
    crate::presence::leave(&context).await;
    Ok(())
}

const BUSY: &str = "the server has too many connections; try again later";
const CROWDED: &str = "too many connections from your address; try again later";

fn lock(repeated: &Mutex<Repeated>) -> MutexGuard<'_, Repeated> {
    repeated
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A connection accepted, not placed yet: with the PROXY protocol on, its
/// header is still to be read, and its place under the per-address limit
/// taken.
struct Accepted {
    stream: TcpStream,
    /// The direct peer.
    peer: SocketAddr,
    /// Its place, when the direct peer is the client.
    from_ip: Option<FromIp>,
    per_ip: Arc<PerIp>,
    repeated: Arc<Mutex<Repeated>>,
}

/// A connection placed: its client's address, and its place under the
/// per-address limit.
struct Placed {
    stream: TcpStream,
    arrival: Arrival,
    from_ip: FromIp,
}

/// Places the connection: at once without the PROXY protocol, once its
/// header is read with it. `None`: refused, and closed.
async fn place(accepted: Box<Accepted>, context: &Context) -> Option<Placed> {
    let Accepted {
        stream,
        peer,
        from_ip,
        per_ip,
        repeated,
    } = *accepted;
    match from_ip {
        Some(from_ip) => Some(Placed {
            stream,
            arrival: Arrival::direct(peer),
            from_ip,
        }),
        None => through_balancer(stream, peer, context, &per_ip, &repeated).await,
    }
}

/// Places the connection (with the PROXY protocol, once its header is
/// read), opens its session, and makes its connection (with TLS, once the
/// handshake is done). `None`: refused, or the handshake failed; closed.
async fn begin(
    accepted: Box<Accepted>,
    context: &Context,
) -> Option<(Connection, Session, FromIp)> {
    let Placed {
        stream,
        arrival,
        from_ip,
    } = place(accepted, context).await?;
    let session = context.sessions.open(arrival.peer);
    name_span(context, &arrival, &session);
    match open(stream, arrival.early, context).await {
        Some(conn) => Some((conn, session, from_ip)),
        None => {
            finish(context, session);
            None
        }
    }
}

/// Completes the connection's span: its session, and with the PROXY
/// protocol on its peer, the header's, known only now. (A function, so that
/// the span's handle is not kept in every connection's task.)
fn name_span(context: &Context, arrival: &Arrival, session: &Session) {
    let span = tracing::Span::current();
    if context.config.proxy_protocol.is_some() {
        span.record("peer", tracing::field::display(arrival.peer));
    }
    span.record("session", session.id());
}

/// With the PROXY protocol on: reads the connection's header, within the
/// request timeout (10 s without one), as a TLS handshake is, and places
/// the client it names under the per-address limit. `None`: refused, and
/// closed, without a reply when the header was at fault.
async fn through_balancer(
    mut stream: TcpStream,
    direct: SocketAddr,
    context: &Context,
    per_ip: &Arc<PerIp>,
    repeated: &Mutex<Repeated>,
) -> Option<Placed> {
    let limit = context
        .config
        .request_timeout
        .unwrap_or(Duration::from_secs(10));
    let header = proxy_protocol::read_header(&mut stream, direct);
    let why = match tokio::time::timeout(limit, header).await {
        Ok(Ok(arrival)) => {
            if !arrival.proxied {
                tracing::debug!(
                    "the PROXY header names no client (LOCAL or UNKNOWN): the balancer's own"
                );
            }
            let max = context.config.max_connections_per_ip;
            if let Some(from_ip) = per_ip.enter(arrival.peer.ip(), max) {
                return Some(Placed {
                    stream,
                    arrival,
                    from_ip,
                });
            }
            lock(repeated).crowded();
            context.metrics.refused_per_ip.inc();
            answer_refusal(stream, arrival.peer, context, CROWDED).await;
            return None;
        }
        Ok(Err(refusal)) => refusal.to_string(),
        Err(_) => format!("no PROXY header within {} s", limit.as_secs_f64()),
    };
    tracing::debug!("{why}, closing without a reply");
    context.metrics.refused_proxy.inc();
    lock(repeated).proxy();
    None
}

/// Conditions of the accept loop that come in floods, each logged at most
/// once a second with the count since its last line.
#[derive(Debug, Default)]
struct Repeated {
    exhausted: Throttle,
    starved: Throttle,
    busy: Throttle,
    crowded: Throttle,
    proxy: Throttle,
}

impl Repeated {
    fn exhausted(&mut self) {
        if let Some(count) = self.exhausted.hit(Instant::now()) {
            Self::log_exhausted(count);
        }
    }

    fn starved(&mut self) {
        if let Some(count) = self.starved.hit(Instant::now()) {
            Self::log_starved(count);
        }
    }

    fn busy(&mut self) {
        if let Some(count) = self.busy.hit(Instant::now()) {
            Self::log_busy(count);
        }
    }

    fn crowded(&mut self) {
        if let Some(count) = self.crowded.hit(Instant::now()) {
            Self::log_crowded(count);
        }
    }

    fn proxy(&mut self) {
        if let Some(count) = self.proxy.hit(Instant::now()) {
            Self::log_proxy(count);
        }
    }

    /// When counts not logged yet are due.
    fn due(&self) -> Option<Instant> {
        [
            self.exhausted.due(),
            self.starved.due(),
            self.busy.due(),
            self.crowded.due(),
            self.proxy.due(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Logs the counts that are due.
    fn flush(&mut self) {
        let now = Instant::now();
        if let Some(count) = self.exhausted.flush(now) {
            Self::log_exhausted(count);
        }
        if let Some(count) = self.starved.flush(now) {
            Self::log_starved(count);
        }
        if let Some(count) = self.busy.flush(now) {
            Self::log_busy(count);
        }
        if let Some(count) = self.crowded.flush(now) {
            Self::log_crowded(count);
        }
        if let Some(count) = self.proxy.flush(now) {
            Self::log_proxy(count);
        }
    }

    fn log_exhausted(count: u64) {
        tracing::warn!(
            count,
            "accept failed: too many open files (EMFILE); refusing clients with server_busy \
             until descriptors are free (count: since the last such line)"
        );
    }

    fn log_starved(count: u64) {
        tracing::warn!(
            count,
            "accept failed: out of memory (ENOBUFS/ENOMEM); retrying every 10 ms \
             (count: since the last such line)"
        );
    }

    fn log_crowded(count: u64) {
        tracing::warn!(
            count,
            "too many connections from one address (--max-connections-per-ip), refusing \
             (count: since the last such line; the audit trail names the addresses)"
        );
    }

    fn log_proxy(count: u64) {
        tracing::info!(
            count,
            "closed connections without a reply for the PROXY protocol: from a peer outside \
             --proxy-protocol-from, or without a valid header in time (count: since the last \
             such line; each is logged at debug)"
        );
    }

    fn log_busy(count: u64) {
        tracing::warn!(
            count,
            "connection limit reached, refusing (count: since the last such line)"
        );
    }
}

/// Waits until `when`, or for ever.
async fn sleep_until(when: Option<Instant>) {
    match when {
        Some(when) => tokio::time::sleep_until(when.into()).await,
        None => std::future::pending().await,
    }
}

/// With the process out of descriptors, the listener cannot accept: frees
/// the spare descriptor for one waiting client, answers it `server_busy` and
/// closes it, so that clients are turned away instead of waiting in the
/// backlog. Each call takes one client; the accept loop calls it again while
/// `accept` keeps failing. False when no descriptor could be freed.
async fn refuse_with_spare(listener: &TcpListener, spare: &mut Spare) -> bool {
    if !spare.free() {
        return false;
    }
    // One try, not a wait, and through tokio: out of descriptors, `accept`
    // fails before it looks for a client, so only with one free does it say
    // that nobody waits (`WouldBlock`), which tokio needs to see to wait for
    // the next client instead of letting the loop spin.
    let once = std::future::poll_fn(|cx| Poll::Ready(listener.poll_accept(cx))).await;
    let freed = match once {
        Poll::Ready(Ok((stream, _))) => {
            descriptors::refuse_now(&socket2::SockRef::from(&stream), BUSY);
            true
        }
        Poll::Ready(Err(err)) => !descriptors::exhausted(&err),
        Poll::Pending => true,
    };
    spare.retake();
    freed
}

/// Refusals (`server_busy`) under way, bounded: their descriptors are part
/// of what [`descriptors`] reserves.
struct Refusals {
    context: Arc<Context>,
    slots: Arc<Semaphore>,
}

impl Refusals {
    fn new(context: Arc<Context>) -> Refusals {
        Refusals {
            context,
            slots: Arc::new(Semaphore::new(descriptors::REFUSALS_IN_FLIGHT)),
        }
    }

    /// Refuses in a task of its own ([`refuse`]) while slots are free; past
    /// that, at once: the reply without waiting, then the close, counted in
    /// the audit trail only as a repeat of a refusal already written.
    fn refuse(
        &self,
        tasks: &mut JoinSet<()>,
        stream: TcpStream,
        peer: SocketAddr,
        why: &'static str,
    ) {
        match Arc::clone(&self.slots).try_acquire_owned() {
            Ok(slot) => {
                tasks.spawn(refuse(stream, peer, Arc::clone(&self.context), why, slot));
            }
            Err(_) => {
                descriptors::refuse_now(&socket2::SockRef::from(&stream), why);
                let peer = peer.to_string();
                self.context.audit_log.count_repeat(crate::audit::Entry {
                    peer: &peer,
                    vm_id: None,
                    action: "connect",
                    outcome: "refused",
                    detail: why,
                });
            }
        }
    }
}

/// Open connections per client address.
#[derive(Debug, Default)]
struct PerIp(std::sync::Mutex<std::collections::HashMap<IpAddr, usize>>);

/// One connection's place in [`PerIp`], given back when dropped.
struct FromIp(Arc<PerIp>, IpAddr);

impl PerIp {
    fn enter(self: &Arc<Self>, ip: IpAddr, limit: usize) -> Option<FromIp> {
        let mut counts = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let count = counts.entry(ip).or_insert(0);
        if *count >= limit {
            return None;
        }
        *count += 1;
        Some(FromIp(Arc::clone(self), ip))
    }
}

impl Drop for FromIp {
    fn drop(&mut self) {
        let mut counts = self
            .0
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(count) = counts.get_mut(&self.1) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.1);
            }
        }
    }
}

fn configure(stream: &TcpStream, keepalive: Option<Duration>) {
    let _ = stream.set_nodelay(true);
    if let Some(idle) = keepalive {
        let params = socket2::TcpKeepalive::new()
            .with_time(idle)
            .with_interval(Duration::from_secs(10))
            .with_retries(3);
        if let Err(err) = socket2::SockRef::from(stream).set_tcp_keepalive(&params) {
            tracing::debug!(error = %err, "cannot enable TCP keepalive");
        }
    }
}

/// Answers `server_busy`, closes, and records the refusal in the audit
/// trail (in this short-lived task, never in the accept loop). Holds one of
/// [`Refusals`]' slots until done.
async fn refuse(
    stream: TcpStream,
    peer: SocketAddr,
    context: Arc<Context>,
    why: &'static str,
    slot: OwnedSemaphorePermit,
) {
    answer_refusal(stream, peer, &context, why).await;
    drop(slot);
}

/// Answers `server_busy`, closes, and records the refusal.
async fn answer_refusal(stream: TcpStream, peer: SocketAddr, context: &Context, why: &'static str) {
    let reply = Reply::error(ErrorCode::ServerBusy, why);
    Connection::new(stream, context.config.max_request_bytes)
        .close_with(&reply)
        .await;
    context
        .audit_peer(&peer.to_string(), None, "connect", "refused", why)
        .await;
}

/// The connection over `stream`: plain TCP, or with `config.tls` set TLS
/// once the handshake is done. `early` is what was read with a PROXY
/// header: the start of the first request, or of the TLS handshake.
async fn open(stream: TcpStream, early: BytesMut, context: &Context) -> Option<Connection> {
    let config = &context.config;
    let conn = match &config.tls {
        None => Connection::new(stream, config.max_request_bytes).with_input(early),
        Some(tls) if early.is_empty() => handshake(stream, tls, context).await?,
        Some(tls) => handshake(Rewound::new(early, stream), tls, context).await?,
    };
    Some(
        conn.with_request_timeout(config.request_timeout)
            .with_write_timeout(Some(config.write_timeout)),
    )
}

/// The TLS connection over `stream`. A handshake that fails (a plaintext
/// client) or takes longer than the request timeout (10 s without one)
/// gives `None`.
async fn handshake<S>(
    stream: S,
    tls: &Arc<tokio_rustls::rustls::ServerConfig>,
    context: &Context,
) -> Option<Connection>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let config = &context.config;
    let limit = config.request_timeout.unwrap_or(Duration::from_secs(10));
    let accept = tokio_rustls::TlsAcceptor::from(Arc::clone(tls)).accept(stream);
    match tokio::time::timeout(limit, accept).await {
        Ok(Ok(stream)) => Some(Connection::tls(stream, config.max_request_bytes)),
        Ok(Err(err)) => {
            tracing::info!(error = %err, "TLS handshake failed, closing");
            context.metrics.refused_tls.inc();
            None
        }
        Err(_) => {
            context.metrics.refused_tls.inc();
            tracing::info!("no TLS handshake within {}s, closing", limit.as_secs());
            None
        }
    }
}

/// What woke a waiting connection up.
enum Next {
    /// A request is buffered.
    Input,
    Event(Event),
    /// The session's token was revoked or expired.
    Ended,
    /// The client sent nothing for the idle timeout.
    Idle,
    /// A request started arriving but was not complete within the request
    /// timeout.
    TimedOut,
    /// The client left, the socket failed, a watcher fell behind, or the
    /// server is shutting down.
    Done,
}

/// Whether a connection goes on after its buffered requests.
enum Flow {
    Continue,
    /// Close it: the client misbehaved beyond recovery, or stopped reading.
    Close,
    /// It was closed already (with a last reply).
    Closed,
}

/// Runs one connection until it closes, the client misbehaves beyond
/// recovery, or the server shuts down.
///
/// Its task's state is what a connection costs while it waits, which is
/// most of the time for most of a fleet: requests are answered in a boxed
/// future ([`answer_buffered`]) that exists only while there are some.
///
/// It borrows what it works on: an `async fn` keeps the arguments it was
/// given beside the locals it moves them into, so values taken by value
/// would be in the task twice.
async fn run(
    conn: &mut Connection,
    context: &Context,
    registry: &'static Registry,
    session: &mut Session,
    stop: &Stop,
) {
    tracing::debug!("connected");
    if registry.quick_ping().is_some() {
        conn.answer_quickly(ping::answer);
    }
    let idle_timeout = context.config.idle_timeout;
    let mut last_input = Instant::now();
    let stopped = stop.stopped();
    tokio::pin!(stopped);
    // One timer for every deadline, since each costs memory in every
    // connection: the idle timeout (only the client's own input counts), the
    // request that has started arriving, and the expiry of the session's
    // token. It is re-armed only for an earlier deadline; one that moved
    // later (the idle timeout, with each request) is re-armed when the
    // earlier one fires, so a busy connection does not touch the timer
    // wheel per request.
    let timer = tokio::time::sleep_until(tokio::time::Instant::now());
    tokio::pin!(timer);
    let mut armed: Option<Instant> = None;
    loop {
        if answer_pings(conn, context, registry, last_input) {
            match Box::pin(answer_buffered(conn, context, registry, session)).await {
                Flow::Continue => {}
                Flow::Close => break,
                Flow::Closed => return,
            }
        }
        if let Err(err) = conn.flush().await {
            tracing::debug!(error = %err, "write failed or timed out");
            break;
        }
        let next = {
            let idle_at = idle_timeout.map(|limit| last_input + limit);
            let request_at = conn.request_deadline();
            let expiry = session.expiry();
            let wake = [idle_at, request_at, expiry].into_iter().flatten().min();
            if let Some(wake) = wake
                && armed.is_none_or(|at| wake < at)
            {
                timer.as_mut().reset(wake.into());
                armed = Some(wake);
            }
            let revoked = session.revoked();
            tokio::select! {
                biased;
                _ = &mut stopped => Next::Done,
                event = session.next_event() => match event {
                    Ok(event) => Next::Event(event),
                    Err(Lagged) => {
                        tracing::info!("watcher fell behind its events, disconnecting");
                        context.metrics.watchers_lagged.inc();
                        Next::Done
                    }
                },
                () = revoked => Next::Ended,
                read = conn.read_input() => match read {
                    Ok(true) => {
                        // The client's own input: what the idle
                        // timeout counts.
                        last_input = Instant::now();
                        Next::Input
                    }
                    Ok(false) => Next::Done,
                    Err(err) => {
                        tracing::debug!(error = %err, "read failed");
                        Next::Done
                    }
                },
                () = &mut timer, if armed.is_some() => {
                    armed = None;
                    let now = Instant::now();
                    if expiry.is_some_and(|at| at <= now) {
                        Next::Ended
                    } else if request_at.is_some_and(|at| at <= now) {
                        Next::TimedOut
                    } else if idle_at.is_some_and(|at| at <= now) {
                        Next::Idle
                    } else {
                        continue;
                    }
                }
            }
        };
        match next {
            Next::Input => {}
            Next::Event(event) => {
                if conn.write_raw(event.line.as_bytes()).await.is_err() {
                    tracing::info!("watcher does not read its events, disconnecting");
                    context.metrics.watchers_slow.inc();
                    break;
                }
                context.metrics.events_delivered.inc();
            }
            Next::Ended => {
                // Ended here at once, so that every list shows it.
                session.settle().await;
            }
            Next::Idle => {
                tracing::info!("idle for too long, closing");
                break;
            }
            Next::Done => break,
            Next::TimedOut => {
                // Answered, so the client learns why; then closed, because
                // the rest of the value may still come and cannot be told
                // from the next request.
                tracing::info!("a request did not arrive within the request timeout, closing");
                let secs = context
                    .config
                    .request_timeout
                    .map_or(0.0, |limit| limit.as_secs_f64());
                let reply = Reply::error(
                    ErrorCode::InvalidJson,
                    format!("the request was not complete within {secs} s; closing the connection"),
                );
                // Boxed, as a rare path, to keep it out of every task.
                Box::pin(conn.close_with(&reply)).await;
                return;
            }
        }
    }
    let _ = conn.flush().await;
}

/// Answers the usual pings at the front of the input (see
/// `commands::ping`) here, without the boxed future and the dispatch of
/// [`answer_buffered`]: most of a fleet's traffic, and on a connection that
/// only pings, all of it. Returns whether anything else is left for
/// [`answer_buffered`] (another request, the start of one, or more pings
/// once the replies queued so far are sent). `since` is when the input
/// arrived.
fn answer_pings(
    conn: &mut Connection,
    context: &Context,
    registry: &Registry,
    since: Instant,
) -> bool {
    let pings = conn.answer_quick();
    if pings > 0 {
        let slot = context.metrics.slot(registry.quick_ping());
        context
            .metrics
            .tally()
            .commands(slot, None, pings, since.elapsed());
    }
    conn.has_input()
}

/// Answers every request already buffered, in order. Replies are queued
/// without waiting, and sent once no further request is buffered (by the
/// caller) or once they are a batch's worth. A client that does not read
/// its replies fills the socket buffer and then that write; past the write
/// timeout it is disconnected.
async fn answer_buffered(
    conn: &mut Connection,
    context: &Context,
    registry: &'static Registry,
    session: &mut Session,
) -> Flow {
    // Counted per batch, and each request's time measured from the end of
    // the one before it (its decoding included): one clock read a request.
    let mut tally = context.metrics.tally();
    let mut mark = Instant::now();
    // Pings answered in a row without decoding (see `commands::ping`) are
    // timed together: one clock read for the run, not one per ping.
    loop {
        let pings = conn.answer_quick();
        if pings > 0 {
            let now = Instant::now();
            let slot = context.metrics.slot(registry.quick_ping());
            tally.commands(slot, None, pings, now - mark);
            mark = now;
            if conn.backlogged() && conn.flush().await.is_err() {
                tracing::info!("the client does not read its replies, disconnecting");
                return Flow::Close;
            }
            continue;
        }
        let Some(incoming) = conn.buffered_request() else {
            break;
        };
        let queued = match incoming {
            Incoming::TooLarge => {
                tracing::info!(
                    limit = context.config.max_request_bytes,
                    "request too large, closing"
                );
                let reply = Reply::error(
                    ErrorCode::RequestTooLarge,
                    format!(
                        "a request may be at most {} bytes; closing the connection",
                        context.config.max_request_bytes
                    ),
                );
                conn.close_with(&reply).await;
                return Flow::Closed;
            }
            Incoming::Bad(reply) => {
                // Not a request at all: counted as an unknown command with
                // its error code.
                let code = reply.code.unwrap_or(ErrorCode::InvalidRequest);
                let now = Instant::now();
                tally.command(context.metrics.slot(None), Some(code), now - mark);
                mark = now;
                conn.queue_reply(&reply).map_err(SendError::Io)
            }
            Incoming::Request(Request { command, data, id }) => {
                // A revocation or expiry noticed meanwhile applies before
                // this command.
                session.settle().await;
                let (name, slot, handled) = dispatch(context, registry, session, &command, data);
                let handled = handled.await;
                let outcome = handled.as_ref().err().map(|err| err.code);
                let now = Instant::now();
                tally.command(slot, outcome, now - mark);
                mark = now;
                match handled {
                    Ok(mut success) => match success.listing.take() {
                        None => conn
                            .queue_success(&success, id.as_ref())
                            .map_err(SendError::Io),
                        Some(listing) => {
                            let list_type = listing.key;
                            conn.write_listing(Head::of(&success), listing, id.as_ref())
                                .await
                                .map(|bytes| context.metrics.list_written(list_type, bytes))
                        }
                    },
                    Err(err) => {
                        tracing::debug!(command = name, code = %err.code, "command failed");
                        conn.queue_reply(&err.into_reply().with_id(id))
                            .map_err(SendError::Io)
                    }
                }
            }
        };
        let sent = match queued {
            Ok(()) if conn.backlogged() => conn.flush().await.map_err(SendError::Io),
            queued => queued,
        };
        match sent {
            Ok(()) => {}
            Err(SendError::Io(err)) => {
                tracing::info!(error = %err, "the client does not read its replies, disconnecting");
                return Flow::Close;
            }
            Err(SendError::ListFailed(err)) => {
                // The reply's line has started: it can be neither finished
                // nor turned into an error reply.
                context.lists.broke();
                tracing::warn!(error = %err, "a list failed half-way through its reply, closing the connection");
                return Flow::Close;
            }
        }
    }
    Flow::Continue
}

/// The handler of `command`, called: its future is boxed already, so the
/// connection's task holds a pointer to it, not its state. Also the name to
/// log: only a registered one, since an unknown one is arbitrary client
/// input and could be anything, a password included. And the command's
/// slot in the metrics, found by its position in the registry.
fn dispatch<'a>(
    context: &'a Context,
    registry: &Registry,
    session: &'a mut Session,
    command: &str,
    data: crate::protocol::Data,
) -> (&'static str, CommandSlot, HandlerFuture<'a>) {
    match registry.find(command) {
        Some((index, command)) => (
            command.name,
            context.metrics.slot(Some(index)),
            (command.handler)(context, session, data),
        ),
        None => (
            crate::metrics::UNKNOWN_COMMAND,
            context.metrics.slot(None),
            Box::pin(std::future::ready(Err(Error::new(
                ErrorCode::UnknownCommand,
                "unknown command; send {\"command\": \"help\"} for the list",
            )))),
        ),
    }
}

/// Leaves the live lists at once, then records when the VM was last seen.
fn finish(context: &Context, session: Session) {
    tracing::debug!("disconnected");
    context.sessions.close(session);
}
