//! Slot allocation: which chunk slots of the data region are in use.
//!
//! The data region is cut into groups of `1 << class_log2_max` bytes. A group
//! holds slots of one size class while it has any slot in use, and returns to
//! the pool of empty groups when its last slot is freed, so the space of a
//! class that shrinks can serve another. Each group tracks its slots with a
//! bitmap.
//!
//! This is a pure state machine: it decides, it does no I/O, and it does not
//! persist itself. The engine rebuilds it at recovery from the committed chunk
//! metadata (every slot in use belongs to exactly one committed chunk or to an
//! in-memory pending version), so it can never disagree with the metadata.
//! The engine is responsible for *when* a slot is freed: only once its release
//! is durable and no reader holds it.

use std::collections::BTreeSet;

use crate::format::SlotId;

#[derive(Clone, Debug)]
struct Group {
    /// The class of the slots in use, or `None` while the group is empty.
    class_log2: Option<u8>,
    used: u32,
    bitmap: Vec<u64>,
}

/// Slot usage of one device.
#[derive(Clone, Debug)]
pub struct Allocator {
    class_log2_min: u8,
    class_log2_max: u8,
    groups: Vec<Group>,
    /// Per class (indexed from `class_log2_min`): groups with free slots.
    partial: Vec<BTreeSet<u32>>,
    empty: BTreeSet<u32>,
    used_bytes: u64,
}

/// Why a slot could not be marked in use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SlotConflict {
    #[error("slot {0:?} is already in use")]
    InUse(SlotId),
    #[error("slot {slot:?} lies in a group holding {group_class_log2}-bit slots")]
    ClassMismatch { slot: SlotId, group_class_log2: u8 },
    #[error("slot {0:?} lies outside the data region")]
    OutOfRange(SlotId),
}

impl Allocator {
    pub fn new(group_count: u32, class_log2_min: u8, class_log2_max: u8) -> Allocator {
        assert!(class_log2_min <= class_log2_max);
        Allocator {
            class_log2_min,
            class_log2_max,
            groups: (0..group_count)
                .map(|_| Group {
                    class_log2: None,
                    used: 0,
                    bitmap: Vec::new(),
                })
                .collect(),
            partial: (class_log2_min..=class_log2_max)
                .map(|_| BTreeSet::new())
                .collect(),
            empty: (0..group_count).collect(),
            used_bytes: 0,
        }
    }

    fn slots_per_group(&self, class_log2: u8) -> u32 {
        1 << (self.class_log2_max - class_log2)
    }

    fn class_slot(&self, class_log2: u8) -> usize {
        usize::from(class_log2 - self.class_log2_min)
    }

    /// Allocates a slot of `class_log2`, preferring the lowest partly used
    /// group so that the data region stays packed. `None` when full.
    pub fn allocate(&mut self, class_log2: u8) -> Option<SlotId> {
        assert!(
            (self.class_log2_min..=self.class_log2_max).contains(&class_log2),
            "class {class_log2} not configured"
        );
        let class_slot = self.class_slot(class_log2);
        let group_index = match self.partial[class_slot].first() {
            Some(&group) => group,
            None => {
                let group = self.empty.pop_first()?;
                self.assign(group, class_log2);
                group
            }
        };
        let group = &self.groups[group_index as usize];
        let (word, bits) = group
            .bitmap
            .iter()
            .enumerate()
            .find(|(_, bits)| **bits != u64::MAX)
            .expect("a group in the partial set has a free slot");
        let index = word as u32 * 64 + bits.trailing_ones();
        let slot = SlotId {
            group: group_index,
            index,
            class_log2,
        };
        self.set_used(slot);
        Some(slot)
    }

    fn assign(&mut self, group: u32, class_log2: u8) {
        let words = (self.slots_per_group(class_log2) as usize).div_ceil(64);
        let slots = self.slots_per_group(class_log2);
        let entry = &mut self.groups[group as usize];
        entry.class_log2 = Some(class_log2);
        entry.bitmap = vec![0; words];
        // Bits past the last slot are permanently set, so "all ones" means full.
        if !slots.is_multiple_of(64) {
            entry.bitmap[words - 1] = !0u64 << (slots % 64);
        }
        let class_slot = self.class_slot(class_log2);
        self.partial[class_slot].insert(group);
    }

    fn set_used(&mut self, slot: SlotId) {
        let slots = self.slots_per_group(slot.class_log2);
        let class_slot = self.class_slot(slot.class_log2);
        let group = &mut self.groups[slot.group as usize];
        group.bitmap[slot.index as usize / 64] |= 1 << (slot.index % 64);
        group.used += 1;
        if group.used == slots {
            self.partial[class_slot].remove(&slot.group);
        }
        self.used_bytes += slot.bytes();
    }

    /// Marks `slot` in use (recovery). Fails if that is inconsistent.
    pub fn mark_used(&mut self, slot: SlotId) -> Result<(), SlotConflict> {
        if slot.group as usize >= self.groups.len()
            || !(self.class_log2_min..=self.class_log2_max).contains(&slot.class_log2)
            || slot.index >= self.slots_per_group(slot.class_log2)
        {
            return Err(SlotConflict::OutOfRange(slot));
        }
        match self.groups[slot.group as usize].class_log2 {
            None => {
                self.empty.remove(&slot.group);
                self.assign(slot.group, slot.class_log2);
            }
            Some(class) if class != slot.class_log2 => {
                return Err(SlotConflict::ClassMismatch {
                    slot,
                    group_class_log2: class,
                });
            }
            Some(_) => {}
        }
        if self.is_used(slot) {
            return Err(SlotConflict::InUse(slot));
        }
        self.set_used(slot);
        Ok(())
    }

    pub fn is_used(&self, slot: SlotId) -> bool {
        let group = &self.groups[slot.group as usize];
        group.class_log2 == Some(slot.class_log2)
            && group.bitmap[slot.index as usize / 64] & (1 << (slot.index % 64)) != 0
    }

    /// Frees a slot in use.
    ///
    /// # Panics
    /// If the slot is not in use: a double free is an engine bug that would
    /// otherwise hand one slot to two chunks.
    pub fn free(&mut self, slot: SlotId) {
        assert!(self.is_used(slot), "double free of {slot:?}");
        let class_slot = self.class_slot(slot.class_log2);
        let group = &mut self.groups[slot.group as usize];
        group.bitmap[slot.index as usize / 64] &= !(1 << (slot.index % 64));
        group.used -= 1;
        self.used_bytes -= slot.bytes();
        if group.used == 0 {
            group.class_log2 = None;
            group.bitmap = Vec::new();
            self.partial[class_slot].remove(&slot.group);
            self.empty.insert(slot.group);
        } else {
            self.partial[class_slot].insert(slot.group);
        }
    }

    pub fn used_bytes(&self) -> u64 {
        self.used_bytes
    }

    pub fn empty_groups(&self) -> usize {
        self.empty.len()
    }

    /// Every slot in use, in order (for consistency checks).
    pub fn used_slots(&self) -> Vec<SlotId> {
        let mut out = Vec::new();
        for (group_index, group) in self.groups.iter().enumerate() {
            let Some(class_log2) = group.class_log2 else {
                continue;
            };
            for index in 0..self.slots_per_group(class_log2) {
                if group.bitmap[index as usize / 64] & (1 << (index % 64)) != 0 {
                    out.push(SlotId {
                        group: group_index as u32,
                        index,
                        class_log2,
                    });
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use proptest::prelude::*;

    use super::*;

    #[test]
    fn fills_groups_then_reports_full() {
        let mut alloc = Allocator::new(2, 12, 14); // 16 KiB groups: 4 small or 1 large slot
        let small: Vec<_> = (0..4).map(|_| alloc.allocate(12).expect("room")).collect();
        assert!(small.iter().all(|s| s.group == 0));
        let large = alloc.allocate(14).expect("second group");
        assert_eq!(large.group, 1);
        assert_eq!(alloc.allocate(12), None);
        alloc.free(small[2]);
        assert_eq!(alloc.allocate(12), Some(small[2]));
        alloc.free(large);
        assert_eq!(alloc.empty_groups(), 1);
        assert_eq!(
            alloc.allocate(13).map(|s| s.group),
            Some(1),
            "empty group serves another class"
        );
    }

    #[test]
    fn mark_used_detects_conflicts() {
        let mut alloc = Allocator::new(2, 12, 14);
        let slot = SlotId {
            group: 0,
            index: 1,
            class_log2: 12,
        };
        alloc.mark_used(slot).expect("free slot");
        assert_eq!(alloc.mark_used(slot), Err(SlotConflict::InUse(slot)));
        let other = SlotId {
            group: 0,
            index: 0,
            class_log2: 13,
        };
        assert!(matches!(
            alloc.mark_used(other),
            Err(SlotConflict::ClassMismatch { .. })
        ));
        assert!(matches!(
            alloc.mark_used(SlotId {
                group: 9,
                index: 0,
                class_log2: 12
            }),
            Err(SlotConflict::OutOfRange(_))
        ));
    }

    proptest! {
        /// The allocator against a set of used slots: never hands out a slot
        /// twice, frees exactly, and refuses only when the model says full.
        #[test]
        fn matches_a_set_model(ops in prop::collection::vec((any::<bool>(), 12u8..=15, any::<prop::sample::Index>()), 1..400)) {
            let mut alloc = Allocator::new(3, 12, 15);
            let mut model: Vec<SlotId> = Vec::new();
            for (is_alloc, class, pick) in ops {
                if is_alloc || model.is_empty() {
                    match alloc.allocate(class) {
                        Some(slot) => {
                            prop_assert_eq!(slot.class_log2, class);
                            prop_assert!(!model.contains(&slot), "slot {:?} handed out twice", slot);
                            // No overlap in bytes with any slot in use.
                            let start = u64::from(slot.group) << 15 | u64::from(slot.index) << class;
                            for other in &model {
                                let o = u64::from(other.group) << 15 | u64::from(other.index) << other.class_log2;
                                prop_assert!(start + slot.bytes() <= o || o + other.bytes() <= start);
                            }
                            model.push(slot);
                        }
                        None => {
                            // Full for this class: no empty group, and every
                            // group of this class is full.
                            let groups: HashSet<u32> = model.iter().map(|s| s.group).collect();
                            prop_assert_eq!(groups.len(), 3);
                            let same = model.iter().filter(|s| s.class_log2 == class).count() as u32;
                            let class_groups = model.iter().filter(|s| s.class_log2 == class).map(|s| s.group).collect::<HashSet<_>>().len() as u32;
                            prop_assert_eq!(same, class_groups << (15 - class));
                        }
                    }
                } else {
                    let slot = model.swap_remove(pick.index(model.len()));
                    alloc.free(slot);
                }
                let mut used = alloc.used_slots();
                used.sort();
                let mut want = model.clone();
                want.sort();
                prop_assert_eq!(used, want);
                prop_assert_eq!(alloc.used_bytes(), model.iter().map(SlotId::bytes).sum::<u64>());
            }
        }
    }
}
