//! What a server lets its peers make it hold: connections, bytes of requests
//! in flight, and request tasks, each bounded per connection, per identity
//! and for the whole server.
//!
//! A request's bytes (body and payload, as its header announces them) are
//! taken from three budgets before any memory is allocated for them: the
//! connection's, its peer identity's, and the server's. While a budget is
//! short the connection's reader waits, so it stops reading its socket and
//! TCP pushes back on the sender: a peer that announces large frames and
//! stalls holds at most its own budgets, and honest peers of other
//! identities keep the rest. Each request also takes one of the server's
//! request slots, held by its task until the task ends, so the tasks of
//! closed connections (which run to the end, see [`crate::server`]) are
//! bounded too. Everything taken is given back when the request's task
//! ends, or at once for a request the rpc layer answers itself.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The budgets of one server, shared by its connections.
#[derive(Debug)]
pub(crate) struct ServerBudgets {
    connections: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
    requests: Arc<Semaphore>,
    per_identity_bytes: u64,
    per_connection_bytes: u64,
    total_bytes: u64,
    identities: Mutex<HashMap<String, Arc<Semaphore>>>,
}

/// The budgets one connection takes from.
#[derive(Debug)]
pub(crate) struct ConnectionBudgets {
    server: Arc<ServerBudgets>,
    identity: String,
    identity_bytes: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
    _slot: OwnedSemaphorePermit,
}

/// What one request holds until its reply is written (or, if its
/// connection is gone, until its task ends): its bytes, the bytes reserved
/// for its reply, and its request slot.
#[derive(Debug, Default)]
pub(crate) struct Held {
    permits: Vec<OwnedSemaphorePermit>,
}

impl Held {
    /// Holds `other`'s permits too, until this is dropped.
    pub fn merge(&mut self, other: Held) {
        self.permits.extend(other.permits);
    }
}

/// Semaphores count in `u32` per acquisition and `usize` in all; budgets are
/// bytes, so they are kept within both.
fn permits(bytes: u64) -> usize {
    usize::try_from(bytes)
        .unwrap_or(usize::MAX)
        .min(Semaphore::MAX_PERMITS)
}

impl ServerBudgets {
    pub fn new(config: &crate::server::ServerConfig) -> Arc<ServerBudgets> {
        Arc::new(ServerBudgets {
            connections: Arc::new(Semaphore::new(config.connections_max.max(1))),
            bytes: Arc::new(Semaphore::new(permits(config.request_bytes_in_flight_max))),
            requests: Arc::new(Semaphore::new(config.requests_in_flight_max.max(1))),
            per_identity_bytes: config.request_bytes_in_flight_max_per_identity,
            per_connection_bytes: config.request_bytes_in_flight_max_per_connection,
            total_bytes: config.request_bytes_in_flight_max,
            identities: Mutex::new(HashMap::new()),
        })
    }

    /// A connection slot, or `None` at `connections_max`.
    pub fn admit(self: &Arc<Self>) -> Option<OwnedSemaphorePermit> {
        self.connections.clone().try_acquire_owned().ok()
    }

    /// The budgets of an admitted, authenticated connection of `identity`.
    pub fn connection(
        self: &Arc<Self>,
        identity: String,
        slot: OwnedSemaphorePermit,
    ) -> ConnectionBudgets {
        let identity_bytes = self
            .identities
            .lock()
            .entry(identity.clone())
            .or_insert_with(|| Arc::new(Semaphore::new(permits(self.per_identity_bytes))))
            .clone();
        ConnectionBudgets {
            server: self.clone(),
            identity,
            identity_bytes,
            bytes: Arc::new(Semaphore::new(permits(self.per_connection_bytes))),
            _slot: slot,
        }
    }
}

impl ConnectionBudgets {
    /// Waits until a request of `bytes` fits every budget, and takes it. A
    /// request larger than a budget can never fit: the frame limits are
    /// checked against the budgets when the server starts
    /// ([`ServerConfig::check`](crate::server::ServerConfig::check)).
    pub async fn take(&self, bytes: u64) -> Held {
        let mut held = self.take_bytes(bytes).await;
        let request = self
            .server
            .requests
            .clone()
            .acquire_owned()
            .await
            .expect("the request semaphore is never closed");
        held.permits.push(request);
        held
    }

    /// Waits until `bytes` of reply fit every budget beside the
    /// `request_bytes` its request already holds, and takes them. A reply
    /// may be larger than what a budget has room for beside its request (a
    /// storage read of 64 MiB under budgets of a few MiB); it then takes all
    /// of that room, so such replies go one at a time.
    pub async fn take_reply(&self, bytes: u64, request_bytes: u64) -> Held {
        let room = |budget: u64| budget.saturating_sub(request_bytes);
        let fits = bytes
            .min(room(self.server.per_connection_bytes))
            .min(room(self.server.per_identity_bytes))
            .min(room(self.server.total_bytes));
        self.take_bytes(fits).await
    }

    async fn take_bytes(&self, bytes: u64) -> Held {
        let mut held = Held::default();
        if bytes == 0 {
            return held;
        }
        let count = u32::try_from(bytes).unwrap_or(u32::MAX);
        // Always in this order (connection, identity, server, then the
        // request slot), so two connections never each hold what the other
        // waits for.
        for semaphore in [&self.bytes, &self.identity_bytes, &self.server.bytes] {
            // The semaphores are never closed.
            if let Ok(permit) = semaphore.clone().acquire_many_owned(count).await {
                held.permits.push(permit);
            }
        }
        held
    }
}

impl Drop for ConnectionBudgets {
    fn drop(&mut self) {
        // The identity's budget goes when its last connection and request
        // are gone (each holds a clone of the semaphore while it lives).
        let mut identities = self.server.identities.lock();
        if let Some(semaphore) = identities.get(&self.identity)
            && Arc::strong_count(semaphore) <= 2
        {
            identities.remove(&self.identity);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::server::ServerConfig;

    fn config() -> ServerConfig {
        ServerConfig {
            connections_max: 3,
            request_bytes_in_flight_max_per_connection: 100,
            request_bytes_in_flight_max_per_identity: 150,
            request_bytes_in_flight_max: 250,
            requests_in_flight_max: 4,
            ..ServerConfig::default()
        }
    }

    async fn waits<F: std::future::Future>(future: F) -> bool {
        tokio::time::timeout(Duration::from_millis(50), future)
            .await
            .is_err()
    }

    #[tokio::test]
    async fn each_budget_holds_back_what_does_not_fit() {
        let server = ServerBudgets::new(&config());
        let slot = |server: &Arc<ServerBudgets>| server.admit().expect("a connection slot");
        let a1 = server.connection("a".into(), slot(&server));
        let a2 = server.connection("a".into(), slot(&server));
        let b = server.connection("b".into(), slot(&server));
        assert!(server.admit().is_none(), "connections_max is 3");

        // Per connection: 100.
        let first = a1.take(80).await;
        assert!(waits(a1.take(30)).await);
        // Per identity: 150 over a1 and a2.
        let second = a2.take(60).await;
        assert!(waits(a2.take(20)).await);
        // In all: 250; b has its own identity budget but not the server's.
        let third = b.take(100).await;
        assert!(waits(b.take(20)).await);
        // Request slots: 4 in all, a zero-byte request takes one too.
        let fourth = b.take(0).await;
        assert!(waits(b.take(0)).await, "requests_in_flight_max is 4");
        drop(fourth);
        let _fifth = b.take(0).await;
        // What is given back is taken again.
        drop(first);
        let _again = a1.take(90).await;
        drop((second, third));
    }

    #[tokio::test]
    async fn an_identitys_budget_goes_with_its_last_connection() {
        let server = ServerBudgets::new(&config());
        let a1 = server.connection("a".into(), server.admit().expect("slot"));
        let a2 = server.connection("a".into(), server.admit().expect("slot"));
        assert_eq!(server.identities.lock().len(), 1);
        drop(a1);
        assert_eq!(server.identities.lock().len(), 1);
        drop(a2);
        assert!(server.identities.lock().is_empty());
        // The connection slots came back too.
        for _ in 0..3 {
            std::mem::forget(server.admit().expect("slot"));
        }
    }
}
