//! Live sessions: what each open connection is bound to and authenticated as.
//!
//! This module is the only place that knows where session state lives (today
//! in this process's memory). A [`Session`] is owned by its connection task and
//! mirrors every change into the shared [`Sessions`] table; dropping it removes
//! the entry at once, so a closed connection can never linger in the lists
//! (the old server raced here and failed `active_vms` under churn).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::protocol::Timestamp;

/// A snapshot of one session, as the lists show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    pub id: u64,
    pub peer: SocketAddr,
    pub connected_at: Timestamp,
    /// The VM this connection registered or last authenticated as.
    pub vm_id: Option<String>,
    /// When the session authenticated, while it is authenticated (as `vm_id`).
    pub authenticated_at: Option<Timestamp>,
}

impl SessionInfo {
    pub fn is_authenticated(&self) -> bool {
        self.authenticated_at.is_some()
    }
}

/// The table of live sessions, shared by all connections of a server.
#[derive(Debug, Default)]
pub struct Sessions {
    next_id: AtomicU64,
    live: Mutex<HashMap<u64, SessionInfo>>,
}

impl Sessions {
    pub fn new() -> Sessions {
        Sessions::default()
    }

    /// Opens a session for a new connection.
    pub fn open(self: &Arc<Self>, peer: SocketAddr) -> Session {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let info = SessionInfo {
            id,
            peer,
            connected_at: Timestamp::now(),
            vm_id: None,
            authenticated_at: None,
        };
        self.lock().insert(id, info.clone());
        Session {
            info,
            sessions: Arc::clone(self),
        }
    }

    /// Every live session, ordered by id (that is, by connection time).
    pub fn snapshot(&self) -> Vec<SessionInfo> {
        let mut all: Vec<SessionInfo> = self.lock().values().cloned().collect();
        all.sort_by_key(|session| session.id);
        all
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
}

impl Session {
    pub fn id(&self) -> u64 {
        self.info.id
    }

    pub fn peer(&self) -> SocketAddr {
        self.info.peer
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
    pub fn bind(&mut self, vm_id: &str) {
        if self.info.authenticated_at.is_none() {
            self.info.vm_id = Some(vm_id.to_owned());
            self.publish();
        }
    }

    pub fn authenticate(&mut self, vm_id: &str) {
        self.info.vm_id = Some(vm_id.to_owned());
        self.info.authenticated_at = Some(Timestamp::now());
        self.publish();
    }

    pub fn logout(&mut self) {
        self.info.authenticated_at = None;
        self.publish();
    }

    fn publish(&self) {
        self.sessions.lock().insert(self.info.id, self.info.clone());
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.sessions.lock().remove(&self.info.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_follow_their_connection() {
        let sessions = Arc::new(Sessions::new());
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let mut a = sessions.open(peer);
        let b = sessions.open(peer);
        assert_ne!(a.id(), b.id());
        a.bind("one");
        assert_eq!(a.vm_id(), Some("one"));
        assert_eq!(a.authenticated_vm(), None);
        a.authenticate("two");
        a.bind("three");
        assert_eq!(a.authenticated_vm(), Some("two"));
        a.logout();
        assert_eq!(a.vm_id(), Some("two"));
        assert_eq!(a.authenticated_vm(), None);
        let snapshot = sessions.snapshot();
        assert_eq!(snapshot.len(), 2);
        assert_eq!(snapshot[0], *a.info());
        drop(b);
        assert_eq!(sessions.len(), 1);
        drop(a);
        assert!(sessions.is_empty());
    }
}
