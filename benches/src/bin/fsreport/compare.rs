//! flyfs against the best peer keeping the same number of copies.

use crate::model::{Dataset, Outcome, Role};

/// How one flyfs configuration fared on one workload.
#[derive(Debug, Clone, Copy)]
pub enum Row {
    /// Both sides have a value.
    Ratio {
        /// Above 1 when flyfs is better: flyfs / peer for rates, peer / flyfs where lower
        /// is better. Infinite when the denominator is 0 and the numerator is not.
        ratio: f64,
        /// flyfs's value.
        flyfs: f64,
        /// The best peer (system index).
        peer: usize,
        /// The best peer's value.
        peer_value: f64,
    },
    /// flyfs did not run this workload.
    NoFlyfsResult,
    /// flyfs's run failed.
    FlyfsError,
    /// No peer with as many copies has a value.
    NoPeerResult,
}

impl Row {
    /// Why there is no ratio, in words; `None` when there is one.
    pub fn reason(&self) -> Option<&'static str> {
        match self {
            Row::Ratio { .. } => None,
            Row::NoFlyfsResult => Some("no flyfs result"),
            Row::FlyfsError => Some("flyfs error"),
            Row::NoPeerResult => Some("no peer result"),
        }
    }
}

/// One flyfs configuration against the peers keeping as many copies.
#[derive(Debug)]
pub struct Comparison {
    /// The flyfs system (index).
    pub flyfs: usize,
    /// The number of copies flyfs and these peers keep.
    pub copies: u32,
    /// The peers keeping as many copies (indices, input order); never empty.
    pub peers: Vec<usize>,
    /// One row per workload, indexed like [`Dataset::workloads`].
    pub rows: Vec<Row>,
}

impl Comparison {
    /// Compares every flyfs system that has peers of equal copies; the others are
    /// returned as system indices in the second list.
    pub fn all(data: &Dataset) -> (Vec<Comparison>, Vec<usize>) {
        let mut compared = Vec::new();
        let mut alone = Vec::new();
        for (flyfs, system) in data.systems.iter().enumerate() {
            if system.role != Role::Flyfs {
                continue;
            }
            let peers: Vec<usize> = data
                .systems
                .iter()
                .enumerate()
                .filter(|(_, s)| s.role == Role::Peer && s.copies == system.copies)
                .map(|(i, _)| i)
                .collect();
            if peers.is_empty() {
                alone.push(flyfs);
                continue;
            }
            let rows = (0..data.workloads.len())
                .map(|w| compare_row(data, flyfs, &peers, w))
                .collect();
            compared.push(Comparison {
                flyfs,
                copies: system.copies,
                peers,
                rows,
            });
        }
        (compared, alone)
    }
}

fn compare_row(data: &Dataset, flyfs: usize, peers: &[usize], workload: usize) -> Row {
    let higher = data.workloads[workload].higher_is_better;
    let flyfs_value = match data.outcome(flyfs, workload) {
        None => return Row::NoFlyfsResult,
        Some(Outcome::Error { .. }) => return Row::FlyfsError,
        Some(Outcome::Value { value, .. }) => *value,
    };
    // The first of equal values wins, so ties go to the earlier peer in input order.
    let mut best: Option<(usize, f64)> = None;
    for &peer in peers {
        if let Some(v) = data.value(peer, workload) {
            let better = match best {
                None => true,
                Some((_, b)) => {
                    if higher {
                        v > b
                    } else {
                        v < b
                    }
                }
            };
            if better {
                best = Some((peer, v));
            }
        }
    }
    let Some((peer, peer_value)) = best else {
        return Row::NoPeerResult;
    };
    let (num, den) = if higher {
        (flyfs_value, peer_value)
    } else {
        (peer_value, flyfs_value)
    };
    // Equal values (including both 0) are level; otherwise a 0 denominator is infinity.
    let ratio = if num == den { 1.0 } else { num / den };
    Row::Ratio {
        ratio,
        flyfs: flyfs_value,
        peer,
        peer_value,
    }
}

/// `1 copy`, `3 copies`.
pub fn copies_text(copies: u32) -> String {
    if copies == 1 {
        "1 copy".to_string()
    } else {
        format!("{copies} copies")
    }
}
