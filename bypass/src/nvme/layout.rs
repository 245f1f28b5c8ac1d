//! The NVMe driver's pure arithmetic, kept apart from registers and DMA so
//! that it is tested on any host: the range allocator behind IOVAs and the
//! bounce region, splitting a transfer at the controller's maximum, the
//! PRP entries of a transfer, and the submission/completion ring indices.

/// Size of a memory page as the driver configures the controller (CC.MPS =
/// 0): the unit of PRP entries.
pub(crate) const PAGE_BYTES: u64 = 4096;
/// PRP entries in one list page.
pub(crate) const PRP_LIST_ENTRIES: usize = (PAGE_BYTES / 8) as usize;

/// A first-fit allocator of aligned ranges inside `[start, end)`: the IOVA
/// space (whose width the IOMMU limits, so IOVAs cannot simply be the
/// virtual addresses) and the pages of the bounce region.
#[derive(Debug)]
pub(crate) struct RangeAllocator {
    /// Free ranges as `(start, end)`, sorted and never adjacent.
    free: Vec<(u64, u64)>,
}

impl RangeAllocator {
    pub(crate) fn new(start: u64, end: u64) -> RangeAllocator {
        RangeAllocator {
            free: if start < end {
                vec![(start, end)]
            } else {
                Vec::new()
            },
        }
    }

    /// An allocator over several disjoint `[start, end)` ranges, sorted
    /// (the IOMMU's usable IOVA space has holes); empty ones are dropped
    /// and adjacent ones merged.
    pub(crate) fn from_ranges(ranges: &[(u64, u64)]) -> RangeAllocator {
        let mut free: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
        for &(start, end) in ranges {
            if start >= end {
                continue;
            }
            debug_assert!(
                free.last().is_none_or(|last| last.1 <= start),
                "ranges are sorted and disjoint"
            );
            match free.last_mut() {
                Some(last) if last.1 == start => last.1 = end,
                _ => free.push((start, end)),
            }
        }
        RangeAllocator { free }
    }

    /// A range of `len` units starting at a multiple of `align` (a power of
    /// two), or `None` if no free range holds one.
    pub(crate) fn alloc(&mut self, len: u64, align: u64) -> Option<u64> {
        debug_assert!(align.is_power_of_two());
        if len == 0 {
            return None;
        }
        for index in 0..self.free.len() {
            let (start, end) = self.free[index];
            let aligned = start.checked_next_multiple_of(align)?;
            let Some(alloc_end) = aligned.checked_add(len) else {
                continue;
            };
            if alloc_end > end {
                continue;
            }
            // Replace the free range by what is left on either side.
            let mut rest = Vec::with_capacity(2);
            if start < aligned {
                rest.push((start, aligned));
            }
            if alloc_end < end {
                rest.push((alloc_end, end));
            }
            self.free.splice(index..=index, rest);
            return Some(aligned);
        }
        None
    }

    /// Gives back a range from `alloc`, merging it with its neighbours.
    pub(crate) fn free(&mut self, start: u64, len: u64) {
        let end = start + len;
        let index = self
            .free
            .partition_point(|&(free_start, _)| free_start < start);
        debug_assert!(index == 0 || self.free[index - 1].1 <= start, "double free");
        debug_assert!(
            index == self.free.len() || end <= self.free[index].0,
            "double free"
        );
        let merge_before = index > 0 && self.free[index - 1].1 == start;
        let merge_after = index < self.free.len() && self.free[index].0 == end;
        match (merge_before, merge_after) {
            (true, true) => {
                self.free[index - 1].1 = self.free[index].1;
                self.free.remove(index);
            }
            (true, false) => self.free[index - 1].1 = end,
            (false, true) => self.free[index].0 = start,
            (false, false) => self.free.insert(index, (start, end)),
        }
    }

    /// Units free in all.
    #[cfg(test)]
    pub(crate) fn free_units(&self) -> u64 {
        self.free.iter().map(|(start, end)| end - start).sum()
    }
}

/// The length of the next piece of a transfer of `len` bytes of which
/// `issued` are already in commands: at most `max_bytes`, one NVMe command
/// per piece.
pub(crate) fn next_piece(len: u64, issued: u64, max_bytes: u64) -> u64 {
    debug_assert!(max_bytes > 0 && issued <= len);
    (len - issued).min(max_bytes)
}

/// How a command's data pointer reaches its pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Prp2 {
    /// The data fits in the page of PRP1.
    None,
    /// The data spans exactly two pages: PRP2 is the second.
    Page(u64),
    /// More pages: PRP2 points at a list holding these entries.
    List { entries: usize },
}

/// The PRP entries of `len` bytes of IOVA-contiguous memory at `iova`
/// (dword aligned): PRP1, and the page addresses after the first, written
/// into `list` when there are more than one. Returns `None` if the transfer
/// needs more pages than one list holds.
pub(crate) fn prp(iova: u64, len: u64, list: &mut [u64; PRP_LIST_ENTRIES]) -> Option<(u64, Prp2)> {
    debug_assert!(iova.is_multiple_of(4) && len > 0);
    let first_page = iova & !(PAGE_BYTES - 1);
    let last_page = (iova + len - 1) & !(PAGE_BYTES - 1);
    let later_pages = ((last_page - first_page) / PAGE_BYTES) as usize;
    match later_pages {
        0 => Some((iova, Prp2::None)),
        1 => Some((iova, Prp2::Page(last_page))),
        count if count <= PRP_LIST_ENTRIES => {
            for (index, entry) in list.iter_mut().take(count).enumerate() {
                *entry = first_page + (index as u64 + 1) * PAGE_BYTES;
            }
            Some((iova, Prp2::List { entries: count }))
        }
        _ => None,
    }
}

/// The largest transfer one command may carry: the controller's MDTS (in
/// units of its minimum page, 4 KiB here; 0 is no limit), capped so that one
/// PRP list page describes it wherever it starts in a page.
pub(crate) fn transfer_bytes_max(mdts: u8) -> u64 {
    let list_bytes = PRP_LIST_ENTRIES as u64 * PAGE_BYTES;
    if mdts == 0 || mdts >= 32 {
        list_bytes
    } else {
        (PAGE_BYTES << mdts).min(list_bytes)
    }
}

/// A submission queue's producer side: the driver writes at `tail`, the
/// controller consumes up to the head it reports in completions.
#[derive(Debug)]
pub(crate) struct SubmissionRing {
    entries: u16,
    tail: u16,
    head: u16,
}

impl SubmissionRing {
    pub(crate) fn new(entries: u16) -> SubmissionRing {
        debug_assert!(entries >= 2);
        SubmissionRing {
            entries,
            tail: 0,
            head: 0,
        }
    }

    /// A ring is full when advancing the tail would make it equal the head
    /// (one slot always stays empty, per the specification).
    pub(crate) fn is_full(&self) -> bool {
        (self.tail + 1) % self.entries == self.head
    }

    /// The slot to fill next, and advances the tail past it.
    pub(crate) fn push(&mut self) -> Option<u16> {
        if self.is_full() {
            return None;
        }
        let slot = self.tail;
        self.tail = (self.tail + 1) % self.entries;
        Some(slot)
    }

    pub(crate) fn tail(&self) -> u16 {
        self.tail
    }

    /// Records the head the controller reported (SQHD of a completion).
    pub(crate) fn set_head(&mut self, head: u16) {
        if head < self.entries {
            self.head = head;
        }
    }
}

/// A completion queue's consumer side: the entry at `head` is new when its
/// phase tag equals `phase`, which flips each time the head wraps.
#[derive(Debug)]
pub(crate) struct CompletionRing {
    entries: u16,
    head: u16,
    phase: bool,
}

impl CompletionRing {
    pub(crate) fn new(entries: u16) -> CompletionRing {
        CompletionRing {
            entries,
            head: 0,
            // The queue's memory starts zeroed (phase 0), and the
            // controller writes the first pass with phase 1.
            phase: true,
        }
    }

    pub(crate) fn head(&self) -> u16 {
        self.head
    }

    pub(crate) fn phase(&self) -> bool {
        self.phase
    }

    /// Consumes the entry at the head.
    pub(crate) fn advance(&mut self) {
        self.head += 1;
        if self.head == self.entries {
            self.head = 0;
            self.phase = !self.phase;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ranges_are_aligned_and_reused() {
        let mut allocator = RangeAllocator::new(0x1000, 0x10000);
        let first = allocator.alloc(0x1000, 0x1000).expect("fits");
        assert_eq!(first, 0x1000);
        let second = allocator.alloc(0x100, 0x4000).expect("fits");
        assert_eq!(second, 0x4000);
        assert!(
            allocator.alloc(0x10000, 1).is_none(),
            "larger than the space"
        );
        allocator.free(first, 0x1000);
        allocator.free(second, 0x100);
        assert_eq!(allocator.free_units(), 0xf000);
        assert_eq!(
            allocator.alloc(0xf000, 0x1000),
            Some(0x1000),
            "merged back whole"
        );
        assert!(allocator.alloc(1, 1).is_none());
    }

    #[test]
    fn allocations_stay_out_of_the_holes_between_ranges() {
        // Two ranges with a hole (like the x86 interrupt window) between.
        let mut allocator =
            RangeAllocator::from_ranges(&[(0x1000, 0x4000), (0x4000, 0x5000), (0x8000, 0x10000)]);
        assert_eq!(
            allocator.free_units(),
            0x4000 + 0x8000,
            "adjacent ranges merged"
        );
        // Too large for the first range: lands in the second, not across the hole.
        assert_eq!(allocator.alloc(0x6000, 0x1000), Some(0x8000));
        assert_eq!(allocator.alloc(0x4000, 0x1000), Some(0x1000));
        assert_eq!(allocator.alloc(0x2000, 0x1000), Some(0xe000));
        assert!(
            allocator.alloc(0x1000, 0x1000).is_none(),
            "the hole is never used"
        );
        allocator.free(0x8000, 0x6000);
        allocator.free(0x1000, 0x4000);
        allocator.free(0xe000, 0x2000);
        assert_eq!(allocator.free_units(), 0xc000);
        assert!(
            allocator.alloc(0x9000, 1).is_none(),
            "frees do not merge across the hole"
        );
    }

    proptest! {
        /// Live ranges never overlap, stay inside the space and honour their
        /// alignment; freeing everything restores the whole space.
        #[test]
        fn allocator_never_overlaps(ops in prop::collection::vec((1u64..64, 0u32..4, any::<bool>()), 1..200)) {
            let mut allocator = RangeAllocator::new(16, 1024);
            let mut live: Vec<(u64, u64)> = Vec::new();
            for (len, align_log, free_one) in ops {
                if free_one && !live.is_empty() {
                    let (start, len) = live.swap_remove(live.len() / 2);
                    allocator.free(start, len);
                    continue;
                }
                let align = 1u64 << align_log;
                if let Some(start) = allocator.alloc(len, align) {
                    prop_assert!(start % align == 0);
                    prop_assert!(start >= 16 && start + len <= 1024);
                    for &(other, other_len) in &live {
                        prop_assert!(start + len <= other || other + other_len <= start);
                    }
                    live.push((start, len));
                }
            }
            for (start, len) in live {
                allocator.free(start, len);
            }
            prop_assert_eq!(allocator.free_units(), 1024 - 16);
        }
    }

    #[test]
    fn transfers_split_at_the_maximum() {
        let pieces = |len: u64, max: u64| {
            let mut issued = 0;
            let mut pieces = Vec::new();
            while issued < len {
                let piece = next_piece(len, issued, max);
                pieces.push((issued, piece));
                issued += piece;
            }
            pieces
        };
        assert_eq!(pieces(10, 4), vec![(0, 4), (4, 4), (8, 2)]);
        assert_eq!(pieces(8, 4), vec![(0, 4), (4, 4)]);
        assert_eq!(pieces(3, 4), vec![(0, 3)]);
        assert!(pieces(0, 4).is_empty());
        assert_eq!(next_piece(8, 8, 4), 0);
    }

    #[test]
    fn mdts_caps_at_one_prp_list() {
        assert_eq!(transfer_bytes_max(0), 2 << 20);
        assert_eq!(transfer_bytes_max(5), 128 << 10);
        assert_eq!(transfer_bytes_max(7), 512 << 10);
        assert_eq!(transfer_bytes_max(9), 2 << 20);
        assert_eq!(transfer_bytes_max(12), 2 << 20);
    }

    #[test]
    fn prp_entries_cover_every_page() {
        let mut list = [0u64; PRP_LIST_ENTRIES];
        assert_eq!(prp(0x10000, 4096, &mut list), Some((0x10000, Prp2::None)));
        assert_eq!(prp(0x10200, 512, &mut list), Some((0x10200, Prp2::None)));
        assert_eq!(
            prp(0x10200, 4096, &mut list),
            Some((0x10200, Prp2::Page(0x11000)))
        );
        assert_eq!(
            prp(0x10000, 8192, &mut list),
            Some((0x10000, Prp2::Page(0x11000)))
        );
        assert_eq!(
            prp(0x10000, 3 * 4096, &mut list),
            Some((0x10000, Prp2::List { entries: 2 }))
        );
        assert_eq!(&list[..2], &[0x11000, 0x12000]);
        // 2 MiB starting mid-page: 513 pages, the first in PRP1 and 512 listed.
        assert_eq!(
            prp(0x10200, 2 << 20, &mut list),
            Some((0x10200, Prp2::List { entries: 512 }))
        );
        assert_eq!(list[511], 0x10000 + 512 * 4096);
        assert_eq!(prp(0x10200, (2 << 20) + 4096, &mut list), None);
    }

    #[test]
    fn rings_wrap_and_flip_phase() {
        let mut submissions = SubmissionRing::new(4);
        assert_eq!(submissions.push(), Some(0));
        assert_eq!(submissions.push(), Some(1));
        assert_eq!(submissions.push(), Some(2));
        assert_eq!(submissions.push(), None, "one slot stays empty");
        submissions.set_head(2);
        assert_eq!(submissions.push(), Some(3));
        assert_eq!(submissions.push(), Some(0));
        assert_eq!(submissions.tail(), 1);
        assert!(submissions.is_full());
        submissions.set_head(9);
        assert!(
            submissions.is_full(),
            "an impossible head from the device is ignored"
        );

        let mut completions = CompletionRing::new(3);
        assert!(completions.phase());
        for _ in 0..3 {
            completions.advance();
        }
        assert_eq!(completions.head(), 0);
        assert!(!completions.phase());
        completions.advance();
        assert_eq!(completions.head(), 1);
    }
}
