//! An open directory's listing: the entries fetched so far from the
//! metadata service, page by page, so that the offsets the kernel hands
//! back in `readdir` and `readdirplus` keep meaning the same entry while
//! the directory changes underneath.
//!
//! A `readdirplus` after a plain `readdir` (or of entries listed without
//! attributes) fetches the missing attributes in small batches; an entry
//! removed meanwhile is skipped rather than failing the listing.

use flyfs_client::FsError;
use flyfs_client::fs::FsClient;
use flyfs_proto::ids::InodeId;
use flyfs_proto::wire::meta::{Attr, FileType, User};
use flyfs_rpc::Network;

/// Directory entries fetched per metadata call.
const READDIR_PAGE: u32 = 512;
/// Entries whose attributes a `readdirplus` fetches at once when the
/// listing was fetched without them.
const READDIRPLUS_STAT_BATCH: usize = 32;

/// An open directory: the entries listed so far. Entry `i` has offset
/// `i + 1` (the offset of the entry after it), so an offset the kernel
/// hands back always means the same place, whatever changed meanwhile.
#[derive(Debug)]
pub(crate) struct DirHandle {
    pub(crate) ino: InodeId,
    /// Later pages are fetched with the opener's credentials (permission
    /// to list is checked at open, as on a local file system).
    pub(crate) user: User,
    pub(crate) listing: tokio::sync::Mutex<Listing>,
}

/// What a [`DirHandle`] has listed so far.
#[derive(Debug, Default)]
pub(crate) struct Listing {
    /// `.` and `..` first, then the service's entries in name order.
    pub(crate) entries: Vec<Item>,
    /// Whether the service has entries after the last one fetched.
    more: bool,
    /// Whether anything was fetched (an offset of 0 afterwards is a
    /// `rewinddir`, which must see the directory as it is now).
    pub(crate) started: bool,
}

/// One entry of a [`Listing`].
#[derive(Debug)]
pub(crate) struct Item {
    pub(crate) name: Vec<u8>,
    pub(crate) ino: InodeId,
    pub(crate) kind: FileType,
    pub(crate) attr: Option<Attr>,
    /// Gone when its attributes were fetched (readdirplus skips it).
    pub(crate) gone: bool,
}

impl Listing {
    /// Fetches the next page from the service.
    async fn fetch<N: Network>(
        &mut self,
        client: &FsClient<N>,
        dir: &DirHandle,
        plus: bool,
    ) -> Result<(), FsError> {
        let after = match self.entries.len() {
            0..=2 => Vec::new(),
            n => self.entries[n - 1].name.clone(),
        };
        let rsp = client
            .readdir(&dir.user, dir.ino, &after, READDIR_PAGE, plus)
            .await?;
        self.more = rsp.more;
        self.entries.extend(rsp.entries.into_iter().map(|e| Item {
            name: e.name,
            ino: e.ino,
            kind: e.kind,
            attr: e.attr,
            gone: false,
        }));
        Ok(())
    }

    /// Starts (or, after a rewind, restarts) the listing with `.` and `..`
    /// and the first page.
    pub(crate) async fn start<N: Network>(
        &mut self,
        client: &FsClient<N>,
        dir: &DirHandle,
        plus: bool,
    ) -> Result<(), FsError> {
        // `..` is looked up alongside the first page: its inode number is
        // what readdir shows for it.
        let (this, parent) = tokio::join!(
            client.stat(&dir.user, dir.ino),
            client.lookup(&dir.user, dir.ino, b".."),
        );
        let this = this?;
        let parent = parent.unwrap_or_else(|_| this.clone());
        self.entries.clear();
        for (name, attr) in [(&b"."[..], this), (&b".."[..], parent)] {
            self.entries.push(Item {
                name: name.to_vec(),
                ino: attr.ino,
                kind: FileType::Directory,
                attr: Some(attr),
                gone: false,
            });
        }
        self.more = true;
        self.started = true;
        self.fetch(client, dir, plus).await
    }

    /// Makes entry `index` available if the directory has it.
    pub(crate) async fn reach<N: Network>(
        &mut self,
        client: &FsClient<N>,
        dir: &DirHandle,
        index: usize,
        plus: bool,
    ) -> Result<bool, FsError> {
        while index >= self.entries.len() && self.more {
            self.fetch(client, dir, plus).await?;
        }
        Ok(index < self.entries.len())
    }

    /// Fetches the attributes of the entries from `index` on that were
    /// listed without them (a readdirplus after a plain readdir).
    pub(crate) async fn fill_attrs<N: Network>(
        &mut self,
        client: &FsClient<N>,
        user: &User,
        index: usize,
    ) {
        let end = (index + READDIRPLUS_STAT_BATCH).min(self.entries.len());
        let missing: Vec<usize> = (index..end)
            .filter(|&i| self.entries[i].attr.is_none() && !self.entries[i].gone)
            .collect();
        let stats = futures::future::join_all(
            missing
                .iter()
                .map(|&i| client.stat(user, self.entries[i].ino)),
        )
        .await;
        for (i, stat) in missing.into_iter().zip(stats) {
            match stat {
                Ok(attr) => self.entries[i].attr = Some(attr),
                // Removed since it was listed: listed without it.
                Err(_) => self.entries[i].gone = true,
            }
        }
    }
}
