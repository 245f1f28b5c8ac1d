//! What the metadata service asks of storage about a file's data: where it
//! ends (the exact length on close and fsync), cutting it at a length
//! (truncate), and deleting all of it (GC).
//!
//! A file's chunk `i` lives on chain `layout.chain_of(i)`, so each chain of
//! the layout holds every `stripe`-th chunk. Storage answers "the highest
//! chunk of this inode on this chain" cheaply (its chunk keys sort by inode
//! then index), which is all three operations need: the length is the end
//! of the highest chunk over all chains, and truncate and delete remove
//! every index up to the highest one on each chain. Removing a chunk that
//! does not exist succeeds, so sparse files and repeated calls are fine.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use flyfs_client::storage::{ClientError, StorageClient};
use flyfs_proto::ids::{ChainId, ChunkId, InodeId};
use flyfs_rpc::Network;
use futures::StreamExt;

use crate::ns::layout::StoredLayout;

/// Chunk operations in flight at once per file operation.
const IN_FLIGHT: usize = 32;

/// The storage side of a metadata operation failed.
#[derive(Debug, thiserror::Error)]
#[error("{what} of {ino:?}: {source}")]
pub struct DataError {
    pub what: &'static str,
    pub ino: InodeId,
    #[source]
    pub source: ClientError,
}

/// A file's data on storage.
#[derive(Debug)]
pub struct FileChunks<'a, N: Network> {
    pub storage: &'a Arc<StorageClient<N>>,
    pub ino: InodeId,
    pub layout: &'a StoredLayout,
    /// Counts the chains asked for their last chunk, when set.
    pub queries: Option<&'a AtomicU64>,
}

impl<N: Network> FileChunks<'_, N> {
    fn error(&self, what: &'static str) -> impl Fn(ClientError) -> DataError + '_ {
        move |source| DataError {
            what,
            ino: self.ino,
            source,
        }
    }

    /// The highest chunk index and its length on each chain of the layout
    /// (position in the layout, index, bytes), for chains holding any.
    async fn last_chunks(&self, what: &'static str) -> Result<Vec<(u32, u32, u32)>, DataError> {
        self.last_chunks_of(what, None).await
    }

    /// As [`last_chunks`](Self::last_chunks), asking only the chains that
    /// hold chunk indices in `chunks` (inclusive; every chain when `None`).
    async fn last_chunks_of(
        &self,
        what: &'static str,
        chunks: Option<(u64, u64)>,
    ) -> Result<Vec<(u32, u32, u32)>, DataError> {
        let stripe = self.layout.stripe();
        let chains: Vec<(u32, ChainId)> = self
            .layout
            .chains()
            .iter()
            .enumerate()
            .map(|(position, chain)| (position as u32, *chain))
            .filter(|&(position, _)| match chunks {
                None => true,
                Some((first, last)) => holds_any(stripe, position, first, last),
            })
            .collect();
        if let Some(counter) = self.queries {
            counter.fetch_add(chains.len() as u64, Ordering::Relaxed);
        }
        let answers =
            futures::future::join_all(chains.iter().map(|&(position, chain)| async move {
                let last = self.storage.last_chunk(chain, self.ino).await?;
                Ok::<_, ClientError>(last.map(|meta| (position, meta.chunk.index, meta.len)))
            }))
            .await;
        let mut found = Vec::new();
        for answer in answers {
            if let Some(last) = answer.map_err(self.error(what))? {
                found.push(last);
            }
        }
        Ok(found)
    }

    /// Where the data ends: the end of the highest chunk over all chains.
    pub async fn length(&self) -> Result<u64, DataError> {
        self.length_of(None).await
    }

    /// Where the data ends, asking only the chains that hold chunk indices
    /// in `chunks` (every chain when `None`): for a caller that knows no
    /// other chunk can lie past the answer.
    pub async fn length_of(&self, chunks: Option<(u64, u64)>) -> Result<u64, DataError> {
        let chunk_size = u64::from(self.layout.chunk_size());
        Ok(self
            .last_chunks_of("length", chunks)
            .await?
            .into_iter()
            .map(|(_, index, len)| u64::from(index) * chunk_size + u64::from(len))
            .max()
            .unwrap_or(0))
    }

    /// Drops every byte at or after `length`: chunks wholly past it are
    /// removed, the chunk it falls in is cut.
    pub async fn truncate(&self, length: u64) -> Result<(), DataError> {
        let chunk_size = u64::from(self.layout.chunk_size());
        let first_gone = length.div_ceil(chunk_size);
        let last = self.last_chunks("truncate").await?;
        let mut removals = Vec::new();
        for &(position, highest, _) in &last {
            removals.extend(indices_on(
                self.layout.stripe(),
                position,
                first_gone,
                highest,
            ));
        }
        self.remove_all_of(removals, "truncate").await?;
        let partial = length % chunk_size;
        let boundary = length / chunk_size;
        // Only cut a boundary chunk that may exist: one at or below the
        // highest index of its chain.
        let boundary_position = (boundary % u64::from(self.layout.stripe())) as u32;
        let exists = last.iter().any(|&(position, highest, _)| {
            position == boundary_position && u64::from(highest) >= boundary
        });
        // An index past u32 lies past any chunk a layout can address.
        if partial != 0
            && exists
            && let Ok(index) = u32::try_from(boundary)
        {
            let chain = self.layout.chain_of(index);
            self.storage
                .truncate(
                    chain,
                    ChunkId {
                        inode: self.ino,
                        index,
                    },
                    partial as u32,
                    self.layout.chunk_size(),
                )
                .await
                .map_err(self.error("truncate"))?;
        }
        Ok(())
    }

    /// Makes `bytes` the file's whole data on storage, from offset 0 (data
    /// held inline moving to storage; it fits the first chunk): writes
    /// them, then cuts whatever an earlier attempt left past them.
    pub async fn write_whole(&self, bytes: bytes::Bytes) -> Result<(), DataError> {
        let len = bytes.len() as u64;
        if len > 0 {
            self.storage
                .write(
                    self.layout.chain_of(0),
                    ChunkId {
                        inode: self.ino,
                        index: 0,
                    },
                    0,
                    bytes,
                    self.layout.chunk_size(),
                )
                .await
                .map_err(self.error("write"))?;
        }
        self.truncate(len).await
    }

    /// Deletes every chunk of the file; returns how many removals it sent.
    pub async fn delete(&self) -> Result<u64, DataError> {
        let mut sent = 0;
        // Until storage reports nothing left: a writer that had not finished
        // when the first pass listed the chunks may have added one since.
        loop {
            let last = self.last_chunks("delete").await?;
            if last.is_empty() {
                return Ok(sent);
            }
            let mut removals = Vec::new();
            for &(position, highest, _) in &last {
                removals.extend(indices_on(self.layout.stripe(), position, 0, highest));
            }
            sent += removals.len() as u64;
            self.remove_all_of(removals, "delete").await?;
        }
    }

    async fn remove_all_of(&self, indices: Vec<u32>, what: &'static str) -> Result<(), DataError> {
        let chunk_size = self.layout.chunk_size();
        let mut removals = futures::stream::iter(indices)
            .map(|index| async move {
                let chunk = ChunkId {
                    inode: self.ino,
                    index,
                };
                self.storage
                    .remove(self.layout.chain_of(index), chunk, chunk_size)
                    .await
            })
            .buffer_unordered(IN_FLIGHT);
        while let Some(result) = removals.next().await {
            result.map_err(self.error(what))?;
        }
        Ok(())
    }
}

/// Whether the chain at `position` of a layout striped over `stripe` chains
/// holds any chunk index from `first` to `last` (inclusive).
fn holds_any(stripe: u32, position: u32, first: u64, last: u64) -> bool {
    let stripe = u64::from(stripe);
    if last < first {
        return false;
    }
    if last - first + 1 >= stripe {
        return true;
    }
    // The first index at or after `first` on this chain.
    let on_chain = first + (u64::from(position) + stripe - first % stripe) % stripe;
    on_chain <= last
}

/// Chunk indices from `from` to `highest` (inclusive) that live on the chain
/// at `position` of a layout striped over `stripe` chains.
fn indices_on(stripe: u32, position: u32, from: u64, highest: u32) -> impl Iterator<Item = u32> {
    let stripe = u64::from(stripe);
    let first = from + (u64::from(position) + stripe - from % stripe) % stripe;
    (first..=u64::from(highest))
        .step_by(stripe as usize)
        .map(|index| index as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ns::layout::LayoutSpec;
    use flyfs_proto::ids::ChainTableId;

    #[test]
    fn indices_on_a_chain_follow_the_stripe() {
        let layout = StoredLayout::new(
            LayoutSpec {
                chain_table: ChainTableId(1),
                chunk_size: 1 << 20,
                stripe: 3,
            },
            vec![ChainId(1), ChainId(2), ChainId(3)],
        )
        .expect("layout");
        let indices =
            |position, from, highest| indices_on(3, position, from, highest).collect::<Vec<_>>();
        assert_eq!(indices(0, 0, 9), vec![0, 3, 6, 9]);
        assert_eq!(indices(1, 2, 9), vec![4, 7]);
        assert_eq!(indices(2, 2, 9), vec![2, 5, 8]);
        assert_eq!(indices(2, 9, 9), Vec::<u32>::new());
        let holding = |first, last| {
            (0..3)
                .filter(|&position| holds_any(3, position, first, last))
                .collect::<Vec<_>>()
        };
        assert_eq!(holding(0, 0), vec![0]);
        assert_eq!(holding(4, 5), vec![1, 2]);
        assert_eq!(holding(5, 6), vec![0, 2]);
        assert_eq!(holding(7, 100), vec![0, 1, 2]);
        assert_eq!(holding(3, 2), Vec::<u32>::new());
        for index in [0, 3, 6, 9] {
            assert_eq!(layout.chain_of(index), ChainId(1));
        }
    }
}
