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

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{broadcast, mpsc};

use crate::error::Result;
use crate::events::{Event, Topic};
use crate::protocol::Timestamp;
use crate::store::Store;

/// A snapshot of one session, as the lists show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    /// Unique across instances: the instance id in the high 32 bits.
    pub id: u64,
    pub instance_id: i64,
    pub peer: String,
    pub connected_at: Timestamp,
    /// The VM this connection registered or last authenticated as.
    pub vm_id: Option<String>,
    /// When the session authenticated, while it is authenticated (as `vm_id`).
    pub authenticated_at: Option<Timestamp>,
    /// Bumped by every change, so that a late write never undoes a newer one.
    pub version: i64,
}

impl SessionInfo {
    pub fn is_authenticated(&self) -> bool {
        self.authenticated_at.is_some()
    }

    pub(crate) fn db_id(&self) -> i64 {
        i64::try_from(self.id).unwrap_or(i64::MAX)
    }
}

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
        }
    }

    pub fn instance_id(&self) -> i64 {
        self.instance_id.load(Ordering::Acquire)
    }

    pub(crate) fn set_instance_id(&self, id: i64) {
        self.instance_id.store(id, Ordering::Release);
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
            token: None,
            operator: false,
        }
    }

    /// This instance's live sessions, ordered by id.
    pub fn local(&self) -> Vec<SessionInfo> {
        let mut all: Vec<SessionInfo> = self.lock().values().cloned().collect();
        all.sort_by_key(|session| session.id);
        all
    }

    /// Every live session on every instance whose lease is alive: this
    /// instance's from memory, the others' from the database (one query).
    pub async fn everywhere(&self) -> Result<Vec<SessionInfo>> {
        let mut all = self.store.remote_sessions(self.instance_id()).await?;
        all.extend(self.local());
        all.sort_by(|a, b| a.connected_at.cmp(&b.connected_at).then(a.id.cmp(&b.id)));
        Ok(all)
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
    /// The digest and expiry of the token this session authenticated with
    /// or was given.
    token: Option<([u8; 32], std::time::SystemTime)>,
    /// An operator session (opened with the admin token): may list, watch
    /// and read the audit trail, but is not a VM.
    operator: bool,
}

/// A session's subscription to change events.
#[derive(Debug)]
struct Watch {
    topics: Vec<Topic>,
    events: broadcast::Receiver<Event>,
}

/// The watcher fell too far behind its events; it has to go.
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
        self.info.authenticated_at.and(self.info.vm_id.as_deref())
    }

    /// Binds an unauthenticated connection to a VM (after `register`). An
    /// authenticated session stays bound to the VM it is authenticated as.
    /// Binding only decorates `active_vms`, so a failed write is left to the
    /// presence loop rather than failing the registration that succeeded.
    pub async fn bind(&mut self, vm_id: &str) {
        if self.info.authenticated_at.is_none() {
            self.info.vm_id = Some(vm_id.to_owned());
            if self.publish().await.is_err() {
                self.sessions.mark_dirty();
            }
        }
    }

    /// Authenticates the session as `vm_id`. Other instances see it before
    /// this returns; if that write fails, the session stays as it was.
    pub async fn authenticate(&mut self, vm_id: &str) -> Result<()> {
        let before = self.info.clone();
        self.info.vm_id = Some(vm_id.to_owned());
        self.info.authenticated_at = Some(Timestamp::now());
        if let Err(err) = self.publish().await {
            self.info = SessionInfo {
                version: self.info.version,
                ..before
            };
            self.remember();
            return Err(err);
        }
        Ok(())
    }

    /// Ends the authentication. It ends here at once, whatever happens to
    /// the write that tells the other instances.
    pub async fn logout(&mut self) -> Result<()> {
        self.operator = false;
        self.info.authenticated_at = None;
        // Watching needs authentication.
        self.watch = None;
        let written = self.publish().await;
        if written.is_err() {
            self.sessions.mark_dirty();
        }
        written
    }

    pub fn is_operator(&self) -> bool {
        self.operator
    }

    /// Turns the session into an operator session, leaving any VM it was
    /// authenticated as.
    pub async fn become_operator(&mut self) -> Result<()> {
        if self.info.authenticated_at.is_some() {
            self.logout().await?;
        }
        self.token = None;
        self.operator = true;
        Ok(())
    }

    /// Whether the session may read the lists (and watch): a VM's or an
    /// operator's.
    pub fn may_read(&self) -> bool {
        self.operator || self.authenticated_vm().is_some()
    }

    /// Remembers the session's token (its digest and expiry).
    pub fn set_token(&mut self, digest: [u8; 32], expires_at: std::time::SystemTime) {
        self.token = Some((digest, expires_at));
    }

    /// Forgets the session's token, returning its digest (to revoke it).
    pub fn take_token(&mut self) -> Option<[u8; 32]> {
        self.token.take().map(|(digest, _)| digest)
    }

    /// The VM this session is authenticated as, checking `token` when the
    /// request carries one: it must be this session's own, unexpired token.
    pub fn authorized_vm(&self, token: Option<&str>) -> Result<&str> {
        let vm = self
            .authenticated_vm()
            .ok_or_else(crate::Error::not_authenticated)?;
        if let Some(token) = token {
            let valid = self.token.is_some_and(|(digest, expires_at)| {
                crate::secrets::matches_digest(token, &digest)
                    && std::time::SystemTime::now() < expires_at
            });
            if !valid {
                return Err(crate::Error::not_authenticated());
            }
        }
        Ok(vm)
    }

    /// Starts (or changes) the session's subscription to change events.
    pub fn watch(&mut self, topics: Vec<Topic>, events: broadcast::Receiver<Event>) {
        self.watch = Some(Watch { topics, events });
    }

    /// Stops the subscription; false if there was none.
    pub fn unwatch(&mut self) -> bool {
        self.watch.take().is_some()
    }

    pub fn is_watching(&self) -> bool {
        self.watch.is_some()
    }

    /// The next event this session watches for; never completes while it
    /// watches nothing. Cancel safe.
    pub async fn next_event(&mut self) -> Result<Event, Lagged> {
        let Some(watch) = self.watch.as_mut() else {
            return std::future::pending().await;
        };
        loop {
            match watch.events.recv().await {
                Ok(event) if watch.topics.iter().any(|t| t.covers(&event.name)) => {
                    return Ok(event);
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => return Err(Lagged),
                Err(broadcast::error::RecvError::Closed) => return std::future::pending().await,
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
