//! Live sessions: what each open connection is bound to and authenticated as,
//! on this instance and on every other instance sharing the database.
//!
//! This module is the only place that knows where session state lives. Each
//! instance keeps its own sessions in memory (the truth for this instance,
//! available even while the database is not) and mirrors them into the
//! `sessions` table, from which other instances read them. A [`Session`] is
//! owned by its connection task; dropping it removes it from memory at once,
//! and [`Sessions::close`] removes its row.
//!
//! Writes that must be visible to other instances before the client hears
//! back (register, authenticate, logout) are made before the reply.
//! Connections opening and closing are queued for a writer task that writes
//! them in batches (so that `ping` never waits for the database, and a storm
//! of connections costs a few statements, not one each). A write that fails
//! marks the instance "dirty", and the presence loop ([`crate::presence`])
//! writes the whole set again once the database answers.
//!
//! Who a session is, is one value ([`Session`]'s identity): nobody, an
//! operator, or a VM by its [`VmLogin`], which names the token family the
//! session authenticated with. Every successful `authenticate` replaces it
//! whole. A VM login listens in [`Sessions`]' registry for its family's
//! revocation (which [`crate::listener`] learns from any instance) and
//! watches its token's expiry; the connection task then ends it before the
//! next command ([`Session::settle`]).

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime};

use tokio::sync::{Notify, broadcast, mpsc};

use crate::error::Result;
use crate::events::{Event, Topic};
use crate::protocol::Timestamp;
pub use crate::store::SessionInfo;
use crate::store::Store;

/// A connection opened or closed, waiting to be written.
#[derive(Debug)]
pub(crate) enum Change {
    Opened(SessionInfo),
    Closed(SessionInfo),
}

/// How many opens and closes may wait for the writer; past that the
/// instance is marked dirty and rewritten whole at the next renewal.
const QUEUE: usize = 65_536;

/// The sessions of this instance, and the way to everyone's.
#[derive(Debug)]
pub struct Sessions {
    store: Store,
    changes: mpsc::Sender<Change>,
    /// Taken by the writer task when a server starts.
    pending: Mutex<Option<mpsc::Receiver<Change>>>,
    /// This instance's id in `instances`; 0 until it has joined.
    instance_id: AtomicI64,
    next_id: AtomicU64,
    live: Mutex<HashMap<u64, SessionInfo>>,
    /// Set when a write was lost: the presence loop writes everything again.
    dirty: AtomicBool,
    /// The VM sessions of this instance by token family, so that a
    /// revocation (from any instance, through LISTEN/NOTIFY) reaches them.
    families: Mutex<HashMap<i64, Vec<Arc<Revocation>>>>,
    /// Operator sessions and watching sessions, kept by their [`Seat`]s:
    /// changed only when a session changes state, read by the metrics.
    operators: AtomicUsize,
    watchers: AtomicUsize,
}

/// This instance's sessions by state, for the metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub sessions: usize,
    /// Authenticated as a VM.
    pub vms: usize,
    pub operators: usize,
    pub watchers: usize,
}

/// A session's place in one of [`Sessions`]' counts, which it leaves when
/// dropped: whatever ends the state (a new identity, logout, the
/// connection's end) ends the count with it.
struct Seat {
    sessions: Arc<Sessions>,
    watcher: bool,
}

impl Seat {
    fn new(sessions: &Arc<Sessions>, watcher: bool) -> Seat {
        let seat = Seat {
            sessions: Arc::clone(sessions),
            watcher,
        };
        seat.count().fetch_add(1, Ordering::Relaxed);
        seat
    }

    fn count(&self) -> &AtomicUsize {
        if self.watcher {
            &self.sessions.watchers
        } else {
            &self.sessions.operators
        }
    }
}

impl Drop for Seat {
    fn drop(&mut self) {
        self.count().fetch_sub(1, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for Seat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Seat")
    }
}

/// How one VM session learns that its token family was revoked.
#[derive(Debug, Default)]
struct Revocation {
    revoked: AtomicBool,
    notify: Notify,
}

impl Revocation {
    fn revoke(&self) {
        self.revoked.store(true, Ordering::Release);
        // A permit is kept if the session is not waiting right now.
        self.notify.notify_one();
    }

    fn is_revoked(&self) -> bool {
        self.revoked.load(Ordering::Acquire)
    }

    async fn wait(&self) {
        while !self.is_revoked() {
            self.notify.notified().await;
        }
    }
}

/// A session's authentication as a VM: the token family it belongs to, when
/// that token expires, and its place in [`Sessions`]' revocation registry,
/// which it leaves when dropped.
#[derive(Debug)]
pub struct VmLogin {
    family: i64,
    expires_at: SystemTime,
    deadline: Instant,
    revocation: Arc<Revocation>,
    sessions: Arc<Sessions>,
}

impl VmLogin {
    pub fn family(&self) -> i64 {
        self.family
    }

    pub fn expires_at(&self) -> SystemTime {
        self.expires_at
    }

    /// Sets when the family's token expires, which ends the login.
    pub fn expire_at(mut self, expires_at: SystemTime) -> VmLogin {
        let left = expires_at
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        self.expires_at = expires_at;
        self.deadline = Instant::now() + left;
        self
    }

    /// Revoked, or past its token's expiry.
    fn ended(&self) -> Option<Ended> {
        if self.revocation.is_revoked() {
            Some(Ended::Revoked)
        } else if Instant::now() >= self.deadline {
            Some(Ended::Expired)
        } else {
            None
        }
    }
}

impl Drop for VmLogin {
    fn drop(&mut self) {
        let mut families = self.sessions.families();
        if let Some(members) = families.get_mut(&self.family) {
            members.retain(|member| !Arc::ptr_eq(member, &self.revocation));
            if members.is_empty() {
                families.remove(&self.family);
            }
        }
    }
}

/// Why a VM session's authentication ended without a `logout` of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Its token was revoked: a logout by another holder of the token, or an
    /// operator's `revoke`.
    Revoked,
    /// Its token expired.
    Expired,
}

impl Ended {
    pub fn as_str(self) -> &'static str {
        match self {
            Ended::Revoked => "token revoked",
            Ended::Expired => "token expired",
        }
    }
}

impl Sessions {
    pub fn new(store: Store) -> Sessions {
        let (changes, pending) = mpsc::channel(QUEUE);
        Sessions {
            store,
            changes,
            pending: Mutex::new(Some(pending)),
            instance_id: AtomicI64::new(0),
            next_id: AtomicU64::new(0),
            live: Mutex::new(HashMap::new()),
            dirty: AtomicBool::new(false),
            families: Mutex::new(HashMap::new()),
            operators: AtomicUsize::new(0),
            watchers: AtomicUsize::new(0),
        }
    }

    /// Joins a token family before its token is issued or checked, so that
    /// a revocation committed after the check cannot be missed: it finds
    /// this login already listening.
    pub fn enroll(self: &Arc<Self>, family: i64) -> VmLogin {
        let revocation = Arc::new(Revocation::default());
        self.families()
            .entry(family)
            .or_default()
            .push(Arc::clone(&revocation));
        VmLogin {
            family,
            expires_at: SystemTime::UNIX_EPOCH,
            deadline: Instant::now(),
            revocation,
            sessions: Arc::clone(self),
        }
    }

    /// Ends this instance's sessions of these token families: each is told
    /// at once, and is no longer authenticated from its next command on.
    /// Returns how many sessions were told.
    pub fn revoke(&self, families: &[i64]) -> usize {
        let registry = self.families();
        let mut told = 0;
        for family in families {
            for member in registry.get(family).into_iter().flatten() {
                member.revoke();
                told += 1;
            }
        }
        told
    }

    /// The token families of this instance's VM sessions.
    pub fn live_families(&self) -> Vec<i64> {
        self.families().keys().copied().collect()
    }

    fn families(&self) -> MutexGuard<'_, HashMap<i64, Vec<Arc<Revocation>>>> {
        self.families
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn instance_id(&self) -> i64 {
        self.instance_id.load(Ordering::Acquire)
    }

    /// Registers this instance among those sharing the database (called by
    /// [`crate::Context::connect`]; a context made with
    /// [`crate::Context::new`] joins at its first successful renewal).
    pub async fn join(&self, name: &str, lease: std::time::Duration) -> Result<()> {
        let id = self.store.join_instance(name, lease).await?;
        self.instance_id.store(id, Ordering::Release);
        tracing::info!(instance = id, name = %name, "joined");
        Ok(())
    }

    pub(crate) fn mark_dirty(&self) {
        self.dirty.store(true, Ordering::Release);
    }

    pub(crate) fn take_dirty(&self) -> bool {
        self.dirty.swap(false, Ordering::AcqRel)
    }

    pub(crate) fn store(&self) -> &Store {
        &self.store
    }

    /// The queue of opens and closes, for the one writer task.
    pub(crate) fn take_changes(&self) -> Option<mpsc::Receiver<Change>> {
        self.pending
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take()
    }

    fn queue(&self, change: Change) {
        if self.changes.try_send(change).is_err() {
            self.mark_dirty();
        }
    }

    /// Opens a session for a new connection. Its row is written in the
    /// background.
    pub fn open(self: &Arc<Self>, peer: SocketAddr) -> Session {
        let instance_id = self.instance_id();
        let counter = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let id = (u64::try_from(instance_id).unwrap_or_default() << 32) | (counter & 0xffff_ffff);
        let info = SessionInfo {
            id,
            instance_id,
            peer: peer.to_string(),
            connected_at: Timestamp::now(),
            vm_id: None,
            authenticated_at: None,
            version: 0,
        };
        self.lock().insert(id, info.clone());
        if instance_id != 0 {
            self.queue(Change::Opened(info.clone()));
        }
        Session {
            info,
            sessions: Arc::clone(self),
            closed: false,
            watch: None,
            identity: Identity::Nobody(None),
        }
    }

    /// This instance's live sessions, ordered by id.
    pub fn local(&self) -> Vec<SessionInfo> {
        let mut all: Vec<SessionInfo> = self.lock().values().cloned().collect();
        all.sort_by_key(|session| session.id);
        all
    }

    /// Ends a session whose connection closed: it leaves this instance's
    /// lists at once, and its row goes with the writer's next batch (which
    /// also records its VM as seen now).
    pub fn close(&self, mut session: Session) {
        session.closed = true;
        self.lock().remove(&session.info.id);
        if session.info.instance_id != 0 {
            self.queue(Change::Closed(session.info.clone()));
        }
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// The sessions by state, from what is kept anyway: the live map, the
    /// revocation registry (one entry per VM login) and the two counts.
    pub fn counts(&self) -> Counts {
        Counts {
            sessions: self.len(),
            vms: self.families().values().map(Vec::len).sum(),
            operators: self.operators.load(Ordering::Relaxed),
            watchers: self.watchers.load(Ordering::Relaxed),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A poisoned lock only means another thread panicked while holding it;
    /// every update below is a single insert or remove, so the map is whole.
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, SessionInfo>> {
        self.live
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The calling connection's session, handed to every command handler.
#[derive(Debug)]
pub struct Session {
    info: SessionInfo,
    sessions: Arc<Sessions>,
    closed: bool,
    watch: Option<Watch>,
    identity: Identity,
}

/// Who a session is. One value, replaced whole by every successful
/// `authenticate`, so that every list, the audit trail and `logout` agree.
#[derive(Debug)]
enum Identity {
    /// Not authenticated; with why, when its VM login ended under it (its
    /// token revoked or expired), so that the next command can say so.
    Nobody(Option<Ended>),
    /// A VM (`info.vm_id`), by password or by token.
    Vm(VmLogin),
    /// An operator (opened with the admin token): may list, watch and read
    /// the audit trail, but is not a VM.
    Operator { _seat: Seat },
}

/// A session's subscription to change events.
///
/// Live events come from the instance's broadcast; when the watcher starts
/// behind (`since`) or falls behind the broadcast, it reads the event log
/// instead, a page at a time, until a short page says it has caught up.
/// Since `seq` follows commit order and the broadcast was subscribed to
/// before the first page was read, the live events it then holds are those
/// pages' last ones and everything after: skipping what is not after
/// `last` joins the two without a gap or a duplicate.
#[derive(Debug)]
struct Watch {
    topics: Vec<Topic>,
    events: broadcast::Receiver<Event>,
    /// The `seq` of the last event passed (delivered, or not of the topics).
    last: i64,
    /// Events after `last` are to be read from the log.
    behind: bool,
    /// A page read from the log, not yet passed.
    page: VecDeque<Event>,
    _seat: Seat,
}

/// Events read from the log at once: at most a few hundred KiB per
/// watcher that is catching up, however far behind it is.
const LOG_PAGE: i64 = 128;

/// The watcher fell behind its events and cannot catch up from the log
/// (it was pruned past them, or the database does not answer); it has to
/// go, and may resume with `since`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lagged;

impl Session {
    pub fn id(&self) -> u64 {
        self.info.id
    }

    pub fn peer(&self) -> &str {
        &self.info.peer
    }

    /// The client's address without its port (the key of login throttling).
    pub fn peer_ip(&self) -> String {
        self.info
            .peer
            .parse::<SocketAddr>()
            .map(|addr| addr.ip().to_string())
            .unwrap_or_else(|_| self.info.peer.clone())
    }

    pub fn info(&self) -> &SessionInfo {
        &self.info
    }

    /// The VM the connection is bound to, authenticated or not.
    pub fn vm_id(&self) -> Option<&str> {
        self.info.vm_id.as_deref()
    }

    /// The VM this session is authenticated as.
    pub fn authenticated_vm(&self) -> Option<&str> {
        match self.identity {
            Identity::Vm(_) => self.info.vm_id.as_deref(),
            _ => None,
        }
    }

    /// The VM session's login (its token family), if it is one.
    pub fn vm_login(&self) -> Option<&VmLogin> {
        match &self.identity {
            Identity::Vm(login) => Some(login),
            _ => None,
        }
    }

    pub fn is_operator(&self) -> bool {
        matches!(self.identity, Identity::Operator { .. })
    }

    /// Whether the session may read the lists (and watch): a VM's or an
    /// operator's.
    pub fn may_read(&self) -> bool {
        !matches!(self.identity, Identity::Nobody(_))
    }

    /// Binds an unauthenticated connection to a VM (after `register`). An
    /// authenticated session stays who it is.
    /// Binding only decorates `active_vms`, so a failed write is left to the
    /// presence loop rather than failing the registration that succeeded.
    pub async fn bind(&mut self, vm_id: &str) {
        if matches!(self.identity, Identity::Nobody(_)) {
            self.info.vm_id = Some(vm_id.to_owned());
            if self.publish().await.is_err() {
                self.sessions.mark_dirty();
            }
        }
    }

    /// Makes the session the VM `vm_id`, whatever it was before (another
    /// VM, an operator, nobody): what a fresh authentication would give.
    /// Other instances see it before this returns; if that write fails, the
    /// session stays exactly as it was.
    pub async fn become_vm(&mut self, vm_id: &str, login: VmLogin) -> Result<()> {
        let before = self.info.clone();
        self.info.vm_id = Some(vm_id.to_owned());
        self.info.authenticated_at = Some(Timestamp::now());
        self.change(before, Identity::Vm(login)).await
    }

    /// Makes the session an operator's, whatever it was before.
    pub async fn become_operator(&mut self) -> Result<()> {
        let before = self.info.clone();
        self.info.vm_id = None;
        self.info.authenticated_at = None;
        let seat = Seat::new(&self.sessions, false);
        self.change(before, Identity::Operator { _seat: seat })
            .await
    }

    async fn change(&mut self, before: SessionInfo, identity: Identity) -> Result<()> {
        if let Err(err) = self.publish().await {
            self.info = SessionInfo {
                version: self.info.version,
                ..before
            };
            self.remember();
            return Err(err);
        }
        // The previous login (if any) leaves its family here: switching VM
        // does not revoke the token other sessions may share.
        self.identity = identity;
        Ok(())
    }

    /// Ends the authentication (a VM's or an operator's). It ends here at
    /// once, whatever happens to the write that tells the other instances.
    /// The connection stays bound to its VM in `active_vms`.
    pub async fn logout(&mut self) -> Result<()> {
        self.identity = Identity::Nobody(None);
        self.info.authenticated_at = None;
        // Watching needs authentication.
        self.watch = None;
        let written = self.publish().await;
        if written.is_err() {
            self.sessions.mark_dirty();
        }
        written
    }

    /// Completes when this VM session's token is revoked; never while the
    /// session is not a VM's. Borrows nothing, so it can wait beside the
    /// connection's reads. Expiry is a deadline ([`Session::expiry`]) that
    /// the connection waits for with its other deadlines, on one timer.
    pub fn revoked(&self) -> impl Future<Output = ()> + Send + 'static {
        let revocation = self.vm_login().map(|login| Arc::clone(&login.revocation));
        async move {
            match revocation {
                Some(revocation) => revocation.wait().await,
                None => std::future::pending().await,
            }
        }
    }

    /// When this VM session's token expires.
    pub fn expiry(&self) -> Option<Instant> {
        self.vm_login().map(|login| login.deadline)
    }

    /// Ends the VM login if its token was revoked or has expired, so that
    /// the next command sees the session as it now is. Returns why.
    pub async fn settle(&mut self) -> Option<Ended> {
        let ended = self.vm_login()?.ended()?;
        self.end(ended).await;
        Some(ended)
    }

    /// Ends the VM login because its token is no longer live.
    pub async fn end(&mut self, why: Ended) {
        tracing::info!(vm_id = ?self.info.vm_id, reason = why.as_str(), "session ended");
        // Best effort: a lost write is rewritten by the presence loop.
        // Boxed, as a rare path, to keep it out of every connection's task.
        let _ = Box::pin(self.logout()).await;
        self.identity = Identity::Nobody(Some(why));
    }

    /// Why this session's VM login ended under it, if it did and it has not
    /// authenticated since.
    pub fn ended_by(&self) -> Option<Ended> {
        match self.identity {
            Identity::Nobody(ended) => ended,
            _ => None,
        }
    }

    /// Starts (or changes) the session's subscription to change events:
    /// those after `last` (a `seq`), read from the log first when `behind`.
    pub fn watch(
        &mut self,
        topics: Vec<Topic>,
        events: broadcast::Receiver<Event>,
        last: i64,
        behind: bool,
    ) {
        let seat = Seat::new(&self.sessions, true);
        self.watch = Some(Watch {
            topics,
            events,
            last,
            behind,
            page: VecDeque::new(),
            _seat: seat,
        });
    }

    /// Stops the subscription; false if there was none.
    pub fn unwatch(&mut self) -> bool {
        self.watch.take().is_some()
    }

    pub fn is_watching(&self) -> bool {
        self.watch.is_some()
    }

    /// The next event this session watches for, in `seq` order; never
    /// completes while it watches nothing. Cancel safe: a page of the log
    /// whose reading is cancelled is read again.
    pub async fn next_event(&mut self) -> Result<Event, Lagged> {
        let Some(watch) = self.watch.as_mut() else {
            return std::future::pending().await;
        };
        loop {
            let event = if let Some(event) = watch.page.pop_front() {
                event
            } else if watch.behind {
                let page = match self.sessions.store.events_after(watch.last, LOG_PAGE).await {
                    Ok(Some(page)) => page,
                    Ok(None) => {
                        tracing::info!(
                            after = watch.last,
                            "a watcher's events were pruned before it read them"
                        );
                        return Err(Lagged);
                    }
                    Err(err) => {
                        tracing::info!(error = %err, "cannot read the event log for a watcher");
                        return Err(Lagged);
                    }
                };
                watch.behind = page.len() as i64 >= LOG_PAGE;
                watch.page = page.into();
                continue;
            } else {
                match watch.events.recv().await {
                    Ok(event) => event,
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        watch.behind = true;
                        continue;
                    }
                    Err(broadcast::error::RecvError::Closed) => {
                        return std::future::pending().await;
                    }
                }
            };
            if event.seq <= watch.last {
                continue;
            }
            watch.last = event.seq;
            if watch.topics.iter().any(|t| t.covers(&event.name)) {
                return Ok(event);
            }
        }
    }

    fn remember(&self) {
        self.sessions.lock().insert(self.info.id, self.info.clone());
    }

    async fn publish(&mut self) -> Result<()> {
        self.info.version += 1;
        self.remember();
        if self.info.instance_id == 0 {
            return Ok(());
        }
        self.sessions.store.put_session(&self.info).await
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.sessions.lock().remove(&self.info.id);
        if !self.closed {
            // The connection task ended without `Sessions::close` (it was
            // aborted or panicked): the row must go at the next renewal.
            self.sessions.mark_dirty();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The counts follow each state change and each session's end, with
    /// no database needed before the instance joins.
    #[tokio::test]
    async fn counts_follow_states() {
        let store = Store::new("postgres://nobody@127.0.0.1:1/none", 1).unwrap();
        let sessions = Arc::new(Sessions::new(store));
        let peer: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        let nobody = sessions.open(peer);
        let mut vm = sessions.open(peer);
        vm.become_vm("v1", sessions.enroll(1)).await.unwrap();
        let mut op = sessions.open(peer);
        op.become_operator().await.unwrap();
        let (_tx, rx) = broadcast::channel::<Event>(1);
        op.watch(Vec::new(), rx, 0, false);
        let counts = |sessions: &Sessions| {
            let c = sessions.counts();
            (c.sessions, c.vms, c.operators, c.watchers)
        };
        assert_eq!(counts(&sessions), (3, 1, 1, 1));

        // Operator to VM: one seat left, one login joined.
        op.become_vm("v2", sessions.enroll(2)).await.unwrap();
        assert_eq!(counts(&sessions), (3, 2, 0, 1));
        assert!(op.unwatch());
        vm.logout().await.unwrap();
        assert_eq!(counts(&sessions), (3, 1, 0, 0));
        op.become_operator().await.unwrap();
        let (_tx, rx) = broadcast::channel::<Event>(1);
        op.watch(Vec::new(), rx, 0, false);
        assert_eq!(counts(&sessions), (3, 0, 1, 1));

        sessions.close(op);
        sessions.close(vm);
        sessions.close(nobody);
        assert_eq!(counts(&sessions), (0, 0, 0, 0));
    }
}
