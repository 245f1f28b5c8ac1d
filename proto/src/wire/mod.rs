//! Message types of every service.

pub mod meta;
pub mod mgmt;
pub mod storage;

use crate::Method;
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
            mgmt::RegisterNode,
            mgmt::Heartbeat,
            mgmt::GetRouting,
            mgmt::CreateTarget,
            mgmt::CreateChain,
            mgmt::CreateChainTable,
            mgmt::SetTargetOffline,
            mgmt::RemoveNode,
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
}
