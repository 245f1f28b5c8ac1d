//! The caller's side of several cluster managers: storage nodes, storage
//! clients and the admin tool know a list of manager addresses, of which one
//! (the lease holder) is the primary and the others stand by. Every call
//! goes to the manager that last answered as primary; on `NotPrimary` it
//! moves to the primary the answer names (or the next address), and on a
//! connection failure or an `Unavailable` status (a standby's answer to
//! `GetRouting`) to the next address, so a takeover costs callers at most a
//! few redirected calls. No randomness and no clock: the same code runs in
//! the deterministic simulation.

use std::io;

use bytes::Bytes;
use flyfs_proto::Method;
use flyfs_proto::wire::mgmt::{
    Assembled, GetRouting, GetRoutingPage, GetRoutingPageRsp, GetRoutingReq, GetRoutingRsp,
    MgmtError, RoutingAssembly, RoutingInfo,
};
use flyfs_rpc::{CallOptions, Client, Network, RpcError};
use parking_lot::Mutex;

/// A manager's answer that may say "not me".
pub trait ManagerReply {
    /// `Some(primary)` if the manager refused as a standby, with the
    /// primary it named (if it knows one).
    fn not_primary(&self) -> Option<Option<&str>>;
}

impl<T> ManagerReply for Result<T, MgmtError> {
    fn not_primary(&self) -> Option<Option<&str>> {
        match self {
            Err(MgmtError::NotPrimary { primary }) => Some(primary.as_deref()),
            _ => None,
        }
    }
}

impl ManagerReply for GetRoutingRsp {
    fn not_primary(&self) -> Option<Option<&str>> {
        // A standby answers `GetRouting` with an `Unavailable` status.
        None
    }
}

impl ManagerReply for GetRoutingPageRsp {
    fn not_primary(&self) -> Option<Option<&str>> {
        // As `GetRouting`: a standby answers with an `Unavailable` status.
        None
    }
}

/// No manager answered as primary; the last failure is given.
#[derive(Debug, thiserror::Error)]
#[error("cluster manager at {addr}: {source}")]
pub struct ManagerError {
    pub addr: String,
    #[source]
    pub source: RpcError,
}

/// The known managers and which one is the primary.
#[derive(Debug)]
pub struct Managers {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// In configured order, then primaries learnt from redirects.
    addrs: Vec<String>,
    /// Index of the one to try first.
    primary: usize,
}

impl Managers {
    pub fn new(addrs: impl IntoIterator<Item = impl Into<String>>) -> Managers {
        let mut list: Vec<String> = Vec::new();
        for addr in addrs {
            let addr = addr.into();
            if !addr.is_empty() && !list.contains(&addr) {
                list.push(addr);
            }
        }
        Managers {
            state: Mutex::new(State {
                addrs: list,
                primary: 0,
            }),
        }
    }

    /// Every known address, configured ones first.
    pub fn addrs(&self) -> Vec<String> {
        self.state.lock().addrs.clone()
    }

    /// The address tried first: the last one that answered as primary.
    pub fn primary(&self) -> Option<String> {
        let state = self.state.lock();
        state.addrs.get(state.primary).cloned()
    }

    /// Points the next calls at `addr`, learning it if it is new.
    fn prefer(&self, addr: &str) {
        let mut state = self.state.lock();
        let index = match state.addrs.iter().position(|a| a == addr) {
            Some(index) => index,
            None => {
                state.addrs.push(addr.to_string());
                state.addrs.len() - 1
            }
        };
        state.primary = index;
    }

    /// Moves on from `addr` to the address after it.
    fn skip(&self, addr: &str) -> Option<String> {
        let mut state = self.state.lock();
        let len = state.addrs.len();
        if len == 0 {
            return None;
        }
        let from = state.addrs.iter().position(|a| a == addr).unwrap_or(0);
        state.primary = (from + 1) % len;
        state.addrs.get(state.primary).cloned()
    }

    /// Calls `M` on the primary, following redirects and skipping managers
    /// that cannot be reached. Gives up after trying every address twice:
    /// the answer is then the last one (a `NotPrimary` refusal, while a
    /// takeover is in progress) or the last error.
    pub async fn call<M, N>(
        &self,
        rpc: &Client<N>,
        req: &M::Req,
        options: &CallOptions,
    ) -> Result<M::Rsp, ManagerError>
    where
        M: Method,
        M::Rsp: ManagerReply,
        N: Network,
    {
        let Some(mut addr) = self.primary() else {
            return Err(ManagerError {
                addr: String::new(),
                source: RpcError::Connect {
                    addr: String::new(),
                    source: io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "no cluster manager address is configured",
                    ),
                },
            });
        };
        let attempts = 2 * self.state.lock().addrs.len() + 1;
        let mut last = None;
        for _ in 0..attempts {
            let next = match rpc.call::<M>(&addr, req, Bytes::new(), options).await {
                Ok((rsp, _payload)) => match rsp.not_primary() {
                    None => {
                        self.prefer(&addr);
                        return Ok(rsp);
                    }
                    Some(named) => {
                        let named = named.filter(|n| !n.is_empty() && *n != addr);
                        let next = match named {
                            Some(named) => {
                                let named = named.to_string();
                                self.prefer(&named);
                                Some(named)
                            }
                            None => self.skip(&addr),
                        };
                        last = Some(Ok(rsp));
                        next
                    }
                },
                Err(source) if source.is_retryable() => {
                    if matches!(
                        source,
                        RpcError::Timeout { .. } | RpcError::Disconnected { .. }
                    ) {
                        // The connection may be dead without knowing it (a
                        // partition swallows packets); the next call to this
                        // manager connects anew.
                        rpc.disconnect(&addr).await;
                    }
                    let next = self.skip(&addr);
                    last = Some(Err(ManagerError {
                        addr: addr.clone(),
                        source,
                    }));
                    next
                }
                Err(source) => return Err(ManagerError { addr, source }),
            };
            match next {
                Some(next) => addr = next,
                None => break,
            }
        }
        last.unwrap_or_else(|| {
            Err(ManagerError {
                addr,
                source: RpcError::Connect {
                    addr: String::new(),
                    source: io::Error::other("no cluster manager was tried"),
                },
            })
        })
    }
}

/// Asks the primary manager for the routing information, if it is newer
/// than `known` (`RoutingVersion(0)` asks for it whatever it is). Storage
/// nodes and clients both keep their routing fresh with this.
///
/// A table too large for one message comes in pages (docs/rpc-wire-format.md,
/// "Routing in pages"): the first with the answer, the rest asked for one
/// at a time, all of one version; if the table changes between pages the
/// manager answers with the new table's first page and the assembly starts
/// over, so the caller gets one consistent table.
pub async fn fetch_routing<N: Network>(
    rpc: &Client<N>,
    managers: &Managers,
    known: flyfs_proto::ids::RoutingVersion,
    options: &CallOptions,
) -> Result<Option<RoutingInfo>, ManagerError> {
    let req = GetRoutingReq {
        known_version: known,
    };
    let rsp = managers.call::<GetRouting, N>(rpc, &req, options).await?;
    match (rsp.routing, rsp.first_page) {
        (Some(routing), _) => Ok(Some(routing)),
        (None, None) => Ok(None),
        (None, Some(first)) => {
            let assembling = |error| ManagerError {
                addr: managers.primary().unwrap_or_default(),
                source: RpcError::Io(io::Error::new(io::ErrorKind::InvalidData, error)),
            };
            let (mut assembly, mut next) = RoutingAssembly::start(first).map_err(assembling)?;
            loop {
                match next {
                    Assembled::Done(routing) => return Ok(Some(*routing)),
                    Assembled::More(req) => {
                        let rsp = managers
                            .call::<GetRoutingPage, N>(rpc, &req, options)
                            .await?;
                        next = assembly.add(rsp.page).map_err(assembling)?;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirects_and_skips_move_the_primary() {
        let managers = Managers::new(["a:1", "b:1", "", "a:1"]);
        assert_eq!(
            managers.addrs(),
            ["a:1", "b:1"],
            "empty and repeated dropped"
        );
        assert_eq!(managers.primary().as_deref(), Some("a:1"));
        assert_eq!(managers.skip("a:1").as_deref(), Some("b:1"));
        assert_eq!(managers.primary().as_deref(), Some("b:1"));
        assert_eq!(managers.skip("b:1").as_deref(), Some("a:1"));
        managers.prefer("c:1");
        assert_eq!(managers.addrs(), ["a:1", "b:1", "c:1"]);
        assert_eq!(managers.primary().as_deref(), Some("c:1"));
        assert!(Managers::new(Vec::<String>::new()).primary().is_none());
    }

    #[test]
    fn only_not_primary_is_a_redirect() {
        let refused: Result<(), MgmtError> = Err(MgmtError::NotPrimary {
            primary: Some("b:1".into()),
        });
        assert_eq!(refused.not_primary(), Some(Some("b:1")));
        let invalid: Result<(), MgmtError> = Err(MgmtError::Invalid { reason: "x".into() });
        assert_eq!(invalid.not_primary(), None);
        assert_eq!(Ok::<(), MgmtError>(()).not_primary(), None);
    }
}
