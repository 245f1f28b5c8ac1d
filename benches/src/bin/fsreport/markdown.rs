//! `report.md`: the section the driver splices into BENCHMARKS.md.

use std::fmt::Write as _;

use crate::charts;
use crate::compare::{Comparison, Row, copies_text};
use crate::format;
use crate::model::{Dataset, Outcome};

/// Longest error message or note shown, in characters.
const MESSAGE_CHARS: usize = 150;
/// Settings of a system longer than this (joined) go below the table.
const CELL_CHARS: usize = 80;

/// Writes the whole section. `image_prefix` goes before each chart's file name.
pub fn render(
    data: &Dataset,
    comparisons: &[Comparison],
    alone: &[usize],
    image_prefix: &str,
) -> String {
    let mut out = String::new();
    intro(&mut out, data, comparisons);
    systems_table(&mut out, data);
    for group in &data.groups {
        group_section(
            &mut out,
            data,
            comparisons,
            &group.name,
            &group.workloads,
            image_prefix,
        );
    }
    summary(&mut out, data, comparisons, alone, image_prefix);
    out
}

fn intro(out: &mut String, data: &Dataset, comparisons: &[Comparison]) {
    let _ = writeln!(
        out,
        "Run of {}, {} mode, flyfs {}, on {}. Command: {}.",
        md(&data.date),
        md(&data.mode),
        md(&data.revision),
        md(&data.machine),
        code(&data.command),
    );
    out.push('\n');
    if !comparisons.is_empty() {
        out.push_str(
            "Each flyfs configuration is compared with the best peer keeping the same number \
             of copies of the data: the ratio is flyfs ÷ peer for rates and peer ÷ flyfs where \
             lower is better (latencies, times), so above 1 always means flyfs is ahead; \
             ratios of 1 or more are in bold. The local file system is a reference, never a \
             peer.\n\n",
        );
    }
}

fn systems_table(out: &mut String, data: &Dataset) {
    // Short settings fit a column; otherwise each system's are listed under the table.
    let column = data
        .systems
        .iter()
        .all(|s| s.settings.join("; ").chars().count() <= CELL_CHARS);
    if column {
        out.push_str("| system | role | copies | replication | version | settings | notes |\n");
        out.push_str("|---|---|---:|---|---|---|---|\n");
    } else {
        out.push_str("| system | role | copies | replication | version | notes |\n");
        out.push_str("|---|---|---:|---|---|---|\n");
    }
    for system in &data.systems {
        let _ = write!(
            out,
            "| {} | {} | {} | {} | {} |",
            md(&system.label),
            system.role.name(),
            system.copies,
            md(&system.replication),
            md(&system.version),
        );
        if column {
            // In a table, even a `|` inside a code span must be escaped.
            let settings = markdown(&system.settings.join("; ")).replace('|', "\\|");
            let _ = write!(out, " {settings} |");
        }
        let notes: Vec<String> = system.notes.iter().map(|n| md(n)).collect();
        let _ = writeln!(out, " {} |", notes.join("; "));
    }
    out.push('\n');
    if column {
        return;
    }
    out.push_str("Settings:\n\n");
    for system in data.systems.iter().filter(|s| !s.settings.is_empty()) {
        let _ = writeln!(out, "- {}:", md(&system.label));
        for setting in &system.settings {
            let _ = writeln!(out, "  - {}", markdown(setting));
        }
    }
    out.push('\n');
}

/// Footnotes of one table, numbered from 1; equal texts share a number.
#[derive(Default)]
struct Footnotes {
    texts: Vec<String>,
}

impl Footnotes {
    fn mark(&mut self, text: String) -> usize {
        match self.texts.iter().position(|t| *t == text) {
            Some(i) => i + 1,
            None => {
                self.texts.push(text);
                self.texts.len()
            }
        }
    }

    fn write(&self, out: &mut String) {
        for (i, text) in self.texts.iter().enumerate() {
            let _ = writeln!(out, "- <sup>{}</sup> {}", i + 1, text);
        }
        if !self.texts.is_empty() {
            out.push('\n');
        }
    }
}

fn group_section(
    out: &mut String,
    data: &Dataset,
    comparisons: &[Comparison],
    group: &str,
    workloads: &[usize],
    image_prefix: &str,
) {
    let _ = writeln!(out, "**{}**\n", md(group));
    out.push_str("| workload | unit |");
    for system in &data.systems {
        let _ = write!(out, " {} |", md(&system.label));
    }
    for c in comparisons {
        let _ = write!(
            out,
            " {} ÷ best peer ({}) |",
            md(&data.systems[c.flyfs].label),
            copies_text(c.copies)
        );
    }
    out.push('\n');
    out.push_str("|---|---|");
    for _ in 0..data.systems.len() + comparisons.len() {
        out.push_str("---:|");
    }
    out.push('\n');

    let mut notes = Footnotes::default();
    for &w in workloads {
        let workload = &data.workloads[w];
        let unit = if workload.higher_is_better {
            md(&workload.unit)
        } else {
            format!("{} (lower is better)", md(&workload.unit))
        };
        let _ = write!(out, "| {} | {} |", md(&workload.title), unit);
        for (s, system) in data.systems.iter().enumerate() {
            let (text, note, error) = match data.outcome(s, w) {
                None => ("—".to_string(), None, None),
                Some(Outcome::Value { value, note }) => {
                    (format::value(*value), note.as_ref(), None)
                }
                Some(Outcome::Error { message, note }) => {
                    ("error".to_string(), note.as_ref(), Some(message))
                }
            };
            let mut marks = Vec::new();
            if let Some(message) = error {
                marks.push(notes.mark(format!(
                    "{} on {}: error: {}",
                    md(&system.label),
                    md(&workload.title),
                    md(&format::one_line(message, MESSAGE_CHARS))
                )));
            }
            if let Some(note) = note {
                marks.push(notes.mark(md(&format::one_line(note, MESSAGE_CHARS))));
            }
            if marks.is_empty() {
                let _ = write!(out, " {text} |");
            } else {
                let marks: Vec<String> = marks.iter().map(|m| m.to_string()).collect();
                let _ = write!(out, " {text} <sup>{}</sup> |", marks.join(","));
            }
        }
        for c in comparisons {
            match c.rows[w] {
                Row::Ratio { ratio, peer, .. } => {
                    let r = format::ratio(ratio);
                    let r = if ratio >= 1.0 { format!("**{r}**") } else { r };
                    let _ = write!(out, " {r} <sub>{}</sub> |", md(&data.systems[peer].label));
                }
                _ => out.push_str(" — |"),
            }
        }
        out.push('\n');
    }
    out.push('\n');
    notes.write(out);

    let details: Vec<String> = workloads
        .iter()
        .map(|&w| &data.workloads[w])
        .filter(|wl| !wl.details.is_empty())
        .map(|wl| {
            format!(
                "- {} ({}): {}",
                md(&wl.title),
                code(&wl.name),
                md(&wl.details)
            )
        })
        .collect();
    if !details.is_empty() {
        // A paragraph between the footnotes and this list keeps them two lists.
        out.push_str("Workloads:\n\n");
        out.push_str(&details.join("\n"));
        out.push_str("\n\n");
    }
    let _ = writeln!(
        out,
        "![{}: one chart per workload]({}{})\n",
        md(group),
        image_prefix,
        charts::group_file_name(group)
    );
}

fn summary(
    out: &mut String,
    data: &Dataset,
    comparisons: &[Comparison],
    alone: &[usize],
    image_prefix: &str,
) {
    out.push_str("**Summary**\n\n");
    if comparisons.is_empty() && alone.is_empty() {
        out.push_str("No flyfs configuration in this run.\n");
        return;
    }
    for c in comparisons {
        let peers: Vec<String> = c
            .peers
            .iter()
            .map(|&p| md(&data.systems[p].label))
            .collect();
        let mut behind = Vec::new();
        let mut missing = Vec::new();
        let mut ahead = 0;
        for (w, row) in c.rows.iter().enumerate() {
            let workload = &data.workloads[w];
            let name = format!("{}, {}", md(&workload.group), md(&workload.title));
            match *row {
                Row::Ratio {
                    ratio,
                    flyfs,
                    peer,
                    peer_value,
                } => {
                    if ratio >= 1.0 {
                        ahead += 1;
                    } else {
                        let unit = md(&workload.unit);
                        let lower = if workload.higher_is_better {
                            ""
                        } else {
                            "; lower is better"
                        };
                        behind.push(format!(
                            "{name}: {} (flyfs {} {unit}, {} {} {unit}{lower})",
                            format::ratio(ratio),
                            format::value(flyfs),
                            md(&data.systems[peer].label),
                            format::value(peer_value),
                        ));
                    }
                }
                _ => missing.push(format!("{name} ({})", row.reason().unwrap_or_default())),
            }
        }
        let compared = ahead + behind.len();
        // A peer that failed to start has no value anywhere: say so, it compares nothing.
        let silent: Vec<String> = c
            .peers
            .iter()
            .filter(|&&p| (0..data.workloads.len()).all(|w| data.value(p, w).is_none()))
            .map(|&p| md(&data.systems[p].label))
            .collect();
        let silent = match silent.len() {
            0 => String::new(),
            1 => format!("; {} has no results", silent[0]),
            _ => format!("; {} have no results", and_list(&silent)),
        };
        let _ = write!(
            out,
            "- **{}** against {} ({}{silent}): ",
            md(&data.systems[c.flyfs].label),
            and_list(&peers),
            copies_text(c.copies)
        );
        if compared == 0 {
            out.push_str("no row has results on both sides.");
        } else if behind.is_empty() && missing.is_empty() {
            let _ = write!(
                out,
                "**ahead of or level with every peer on every row ({ahead} of {compared}).**"
            );
        } else if behind.is_empty() {
            let _ = write!(
                out,
                "ahead of or level with every peer on all {compared} rows compared."
            );
        } else {
            let _ = write!(
                out,
                "ahead of or level with every peer on {ahead} of {compared} rows compared; \
                 **behind on {}**:",
                behind.len()
            );
        }
        out.push('\n');
        for line in &behind {
            let _ = writeln!(out, "  - {line}");
        }
        if !missing.is_empty() {
            let _ = writeln!(out, "  - not compared: {}.", missing.join("; "));
        }
    }
    for &s in alone {
        let system = &data.systems[s];
        let _ = writeln!(
            out,
            "- **{}**: no peer keeps {}; not compared.",
            md(&system.label),
            copies_text(system.copies)
        );
    }
    out.push('\n');
    if !comparisons.is_empty() {
        let _ = writeln!(
            out,
            "![flyfs ÷ the best peer of equal copies, per workload]({}{})",
            image_prefix,
            charts::RATIO_FILE
        );
    }
}

/// `a`, `a and b`, `a, b and c`.
fn and_list(items: &[String]) -> String {
    match items {
        [] => String::new(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

/// Text from the input made inert in markdown (and on one line, for table cells).
fn md(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\\' | '|' | '*' | '_' | '`' | '[' | ']' => {
                out.push('\\');
                out.push(c);
            }
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '\n' | '\r' => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// Markdown from the input (settings), kept on one line.
fn markdown(text: &str) -> String {
    text.replace(['\n', '\r'], " ")
}

/// Text from the input as inline code, with a fence longer than any backtick run in it.
fn code(text: &str) -> String {
    let text = text.replace(['\n', '\r'], " ");
    let longest = text
        .split(|c| c != '`')
        .map(str::len)
        .max()
        .unwrap_or_default();
    let fence = "`".repeat(longest + 1);
    if longest == 0 {
        format!("{fence}{text}{fence}")
    } else {
        format!("{fence} {text} {fence}")
    }
}
