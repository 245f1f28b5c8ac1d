//! Message types of every service.

pub mod meta;
pub mod mgmt;
pub mod storage;

use crate::Method;
use crate::auth::Roles;
use crate::codec::decode;

/// Calls `$callback!` with every method of every service, as types.
macro_rules! every_method {
    ($callback:ident) => {
        $callback!(
            storage::Write,
            storage::Forward,
            storage::BatchRead,
            storage::QueryVersion,
            storage::LastChunk,
            storage::DumpMeta,
            storage::SyncDone,
            storage::Space,
            storage::FetchChunk,
            mgmt::RegisterNode,
            mgmt::Heartbeat,
            mgmt::GetRouting,
            mgmt::GetRoutingPage,
            mgmt::CreateTarget,
            mgmt::CreateChain,
            mgmt::CreateChainTable,
            mgmt::SetTargetOffline,
            mgmt::RemoveNode,
            mgmt::AddChainMember,
            mgmt::RemoveChainMember,
            mgmt::RemoveTarget,
            mgmt::GetSyncProgress,
            meta::Statfs,
            meta::Stat,
            meta::Lookup,
            meta::Resolve,
            meta::Create,
            meta::Mkdir,
            meta::MkdirAll,
            meta::Symlink,
            meta::Readlink,
            meta::Link,
            meta::Unlink,
            meta::Rmdir,
            meta::Rename,
            meta::Readdir,
            meta::Open,
            meta::Close,
            meta::Sync,
            meta::LengthHint,
            meta::SetAttr,
            meta::GetXattr,
            meta::SetXattr,
            meta::ListXattr,
            meta::RemoveXattr,
            meta::RemoveAll,
            meta::SetLayout,
            meta::GcStatus,
            meta::Mknod,
            meta::RenewLease,
            meta::KvOpen,
            meta::KvLookup,
            meta::KvReserve,
            meta::KvCommit,
            meta::KvRelease,
            meta::KvRemove,
            meta::KvEvict,
            meta::SyncSetAttr,
            meta::SyncSetAttrs,
            meta::SyncNamespace,
            meta::Uninline,
        )
    };
}

/// Every method's id and name, the rpc layer's own ([`Ping`](crate::Ping))
/// included: what metrics and logs name a method id after.
pub static METHODS: &[(u16, &str)] = {
    macro_rules! table {
        ($($m:ty),* $(,)?) => {
            &[(crate::Ping::ID, crate::Ping::NAME), $((<$m>::ID, <$m>::NAME)),*]
        };
    }
    every_method!(table)
};

/// The roles allowed to call each method, the rpc layer's own included:
/// what the rpc server checks before dispatch, in [`METHODS`] order.
pub static METHOD_ROLES: &[(u16, Roles)] = {
    macro_rules! table {
        ($($m:ty),* $(,)?) => {
            &[(crate::Ping::ID, crate::Ping::ROLES), $((<$m>::ID, <$m>::ROLES)),*]
        };
    }
    every_method!(table)
};

/// The roles allowed to call method `id`, or `None` for a method this build
/// does not know (the server answers `UnknownMethod` for it).
pub fn roles_of(id: u16) -> Option<Roles> {
    METHOD_ROLES
        .iter()
        .find(|(method, _)| *method == id)
        .map(|(_, roles)| *roles)
}

/// Decodes `body` as the request and the response of every method (the one
/// whose id is `method` first): the fuzzers' view of every message type a
/// peer can send. Never panics; the results are thrown away.
pub fn fuzz_decode_messages(method: u16, body: &[u8]) {
    fn both<M: Method>(body: &[u8]) {
        let _ = decode::<M::Req>(body);
        let _ = decode::<M::Rsp>(body);
    }
    macro_rules! all {
        ($($m:ty),* $(,)?) => {
            $(if method == <$m>::ID { both::<$m>(body); })*
            $(both::<$m>(body);)*
        };
    }
    every_method!(all);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_ids_and_names_are_unique() {
        let mut ids: Vec<u16> = METHODS.iter().map(|(id, _)| *id).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), METHODS.len());
        let mut names: Vec<&str> = METHODS.iter().map(|(_, name)| *name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), METHODS.len());
    }

    #[test]
    fn every_method_names_its_roles() {
        assert_eq!(METHOD_ROLES.len(), METHODS.len());
        for (id, name) in METHODS {
            let roles = roles_of(*id).expect("every method has roles");
            assert!(!roles.is_empty(), "{name} allows nobody");
        }
        assert_eq!(roles_of(9), None);
        assert_eq!(roles_of(meta::Mknod::ID), Some(meta::Mknod::ROLES));
    }

    #[test]
    fn daemon_only_methods_refuse_clients_and_admins() {
        use crate::auth::Role;
        for id in [
            storage::Forward::ID,
            storage::SyncDone::ID,
            storage::QueryVersion::ID,
            storage::FetchChunk::ID,
            mgmt::RegisterNode::ID,
            mgmt::Heartbeat::ID,
        ] {
            let roles = roles_of(id).expect("known");
            assert_eq!(roles, Roles::STORAGE, "method {id}");
            assert!(!roles.contains(Role::Client) && !roles.contains(Role::Admin));
        }
        // Resync's metadata listing is read-only: operators may read it too,
        // mounts may not.
        assert_eq!(
            roles_of(storage::DumpMeta::ID),
            Some(Roles::STORAGE.or(Roles::ADMIN))
        );
        for id in [
            mgmt::CreateChain::ID,
            mgmt::SetTargetOffline::ID,
            meta::GcStatus::ID,
        ] {
            assert_eq!(roles_of(id), Some(Roles::ADMIN), "method {id}");
        }
    }
}
