//! The results file that `benches/peers` writes, read and checked.
//!
//! Unknown fields are ignored, so the driver can add information before this tool shows
//! it; a missing required field fails with serde's message, which names the field and
//! its line.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::Deserialize;

/// What a system is in the comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The local file system: shown for reference, never counted as a peer.
    Reference,
    /// A flyfs configuration, compared with the peers keeping as many copies.
    Flyfs,
    /// Another distributed file system.
    Peer,
}

impl Role {
    /// The name used in the input and in the report.
    pub fn name(self) -> &'static str {
        match self {
            Role::Reference => "reference",
            Role::Flyfs => "flyfs",
            Role::Peer => "peer",
        }
    }
}

/// One file system under test.
#[derive(Debug, Deserialize)]
pub struct System {
    /// Short identifier, referred to by the results.
    pub name: String,
    /// Human-readable name, used in tables and charts.
    pub label: String,
    /// How many copies of each byte the system keeps.
    pub copies: u32,
    /// How those copies are kept, in words.
    pub replication: String,
    /// The version that ran.
    pub version: String,
    /// Whether the system is the reference, flyfs or a peer.
    pub role: Role,
    /// Settings the driver chose for this system, each markdown on one line (the report
    /// keeps its `code` spans and emphasis).
    #[serde(default)]
    pub settings: Vec<String>,
    /// Remarks on the run of this system.
    #[serde(default)]
    pub notes: Vec<String>,
}

/// One measured quantity, run on every system.
#[derive(Debug, Deserialize)]
pub struct Workload {
    /// Short identifier, referred to by the results.
    pub name: String,
    /// The table and chart the workload belongs to; also part of a file name.
    pub group: String,
    /// Human-readable description, used in tables and charts.
    pub title: String,
    /// Unit of the values, such as `MiB/s`.
    pub unit: String,
    /// Whether a larger value is better (rates) or a smaller one (latencies, times).
    pub higher_is_better: bool,
    /// How the workload runs (tool, options), for the reader.
    #[serde(default)]
    pub details: String,
}

/// One entry of `results` as written: a value or an error.
#[derive(Debug, Deserialize)]
struct RawResult {
    system: String,
    workload: String,
    #[serde(default)]
    value: Option<f64>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    note: Option<String>,
}

/// The file as written by the driver.
#[derive(Debug, Deserialize)]
struct RawResults {
    date: String,
    revision: String,
    machine: String,
    mode: String,
    command: String,
    systems: Vec<System>,
    workloads: Vec<Workload>,
    results: Vec<RawResult>,
}

/// What one system gave on one workload.
#[derive(Debug)]
pub enum Outcome {
    /// A measured value, with an optional remark.
    Value {
        /// The measurement, never negative.
        value: f64,
        /// Remark of the driver on this value.
        note: Option<String>,
    },
    /// The run failed.
    Error {
        /// Why it failed, as the driver reported it.
        message: String,
        /// Remark of the driver on this run.
        note: Option<String>,
    },
}

/// Workloads sharing a table and a chart.
#[derive(Debug)]
pub struct Group {
    /// The group's name, as in the input.
    pub name: String,
    /// Indices into [`Dataset::workloads`], in input order.
    pub workloads: Vec<usize>,
}

/// A checked results file: every result names a known system and workload, once.
#[derive(Debug)]
pub struct Dataset {
    /// When the run started.
    pub date: String,
    /// `git describe` of flyfs.
    pub revision: String,
    /// The machine, in words.
    pub machine: String,
    /// `quick` or `full`.
    pub mode: String,
    /// The command that ran the benchmarks.
    pub command: String,
    /// The systems, in input order (the order of table columns and bars).
    pub systems: Vec<System>,
    /// The workloads, in input order.
    pub workloads: Vec<Workload>,
    /// Groups in order of first appearance.
    pub groups: Vec<Group>,
    outcomes: HashMap<(usize, usize), Outcome>,
}

impl Dataset {
    /// Reads and checks a results file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the results file {}", path.display()))?;
        let raw: RawResults = serde_json::from_str(&text)
            .with_context(|| format!("in the results file {}", path.display()))?;
        Self::check(raw).with_context(|| format!("in the results file {}", path.display()))
    }

    fn check(raw: RawResults) -> Result<Self> {
        if raw.systems.is_empty() {
            bail!("`systems` is empty");
        }
        if raw.workloads.is_empty() {
            bail!("`workloads` is empty");
        }
        let mut system_index = HashMap::new();
        for (i, system) in raw.systems.iter().enumerate() {
            if system_index.insert(system.name.as_str(), i).is_some() {
                bail!("system `{}` appears twice in `systems`", system.name);
            }
            if system.copies == 0 {
                bail!("system `{}`: `copies` must be at least 1", system.name);
            }
        }
        let mut workload_index = HashMap::new();
        let mut groups: Vec<Group> = Vec::new();
        for (i, workload) in raw.workloads.iter().enumerate() {
            if workload_index.insert(workload.name.as_str(), i).is_some() {
                bail!("workload `{}` appears twice in `workloads`", workload.name);
            }
            let group = &workload.group;
            if group.is_empty()
                || !group
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                bail!(
                    "workload `{}`: group `{group}` must be letters, digits, `_` or `-` \
                     (it names the chart file peers-<group>.png)",
                    workload.name
                );
            }
            match groups.iter_mut().find(|g| g.name == *group) {
                Some(g) => g.workloads.push(i),
                None => groups.push(Group {
                    name: group.clone(),
                    workloads: vec![i],
                }),
            }
        }
        let mut outcomes = HashMap::new();
        let mut seen = HashSet::new();
        for (i, result) in raw.results.into_iter().enumerate() {
            let at = format!(
                "results[{i}] (system `{}`, workload `{}`)",
                result.system, result.workload
            );
            let Some(&s) = system_index.get(result.system.as_str()) else {
                bail!("{at}: no such system in `systems`");
            };
            let Some(&w) = workload_index.get(result.workload.as_str()) else {
                bail!("{at}: no such workload in `workloads`");
            };
            if !seen.insert((s, w)) {
                bail!("{at}: a second result for the same system and workload");
            }
            let outcome = match (result.value, result.error) {
                (Some(value), None) => {
                    if value < 0.0 {
                        bail!("{at}: `value` is {value}, values must not be negative");
                    }
                    Outcome::Value {
                        value,
                        note: result.note,
                    }
                }
                (None, Some(message)) => Outcome::Error {
                    message,
                    note: result.note,
                },
                (Some(_), Some(_)) => bail!("{at}: has both `value` and `error`"),
                (None, None) => bail!("{at}: has neither `value` nor `error`"),
            };
            outcomes.insert((s, w), outcome);
        }
        Ok(Self {
            date: raw.date,
            revision: raw.revision,
            machine: raw.machine,
            mode: raw.mode,
            command: raw.command,
            systems: raw.systems,
            workloads: raw.workloads,
            groups,
            outcomes,
        })
    }

    /// What `system` gave on `workload` (indices), if it ran.
    pub fn outcome(&self, system: usize, workload: usize) -> Option<&Outcome> {
        self.outcomes.get(&(system, workload))
    }

    /// The value `system` measured on `workload`, if it ran and succeeded.
    pub fn value(&self, system: usize, workload: usize) -> Option<f64> {
        match self.outcome(system, workload) {
            Some(Outcome::Value { value, .. }) => Some(*value),
            _ => None,
        }
    }
}
