//! PNG charts: one image per group, a small bar chart per workload; and one image of
//! flyfs's ratios to the best peer of equal copies.
//!
//! Sizes are fixed functions of the input (see [`group_chart_size`] and
//! [`ratio_chart_size`]), so a reader's layout does not move between runs.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::compare::{Comparison, Row, copies_text};
use crate::format;
use crate::model::{Dataset, Group, Outcome, Role};

/// The font used when `--font` is not given (Debian's fonts-dejavu-core).
pub const DEFAULT_FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
/// File name of the ratio chart.
pub const RATIO_FILE: &str = "peers-ratio.png";
/// Width of every image, in pixels.
pub const WIDTH: u32 = 1600;

const FAMILY: &str = "sans-serif";
const INK: RGBColor = RGBColor(0x22, 0x22, 0x22);
const MUTED: RGBColor = RGBColor(0x6b, 0x6b, 0x6b);
const GRID: RGBColor = RGBColor(0xdd, 0xdd, 0xdd);
const ERROR: RGBColor = RGBColor(0xb0, 0x2a, 0x2a);
const AHEAD: RGBColor = RGBColor(0x2e, 0x9e, 0x4f);
const BEHIND: RGBColor = RGBColor(0xd6, 0x45, 0x41);

const FLYFS_COLORS: [RGBColor; 3] = [
    RGBColor(0x1f, 0x5f, 0xad),
    RGBColor(0x7f, 0xb2, 0xe5),
    RGBColor(0x0b, 0x3c, 0x74),
];
const REFERENCE_COLOR: RGBColor = RGBColor(0xa0, 0xa0, 0xa0);
const PEER_COLORS: [RGBColor; 8] = [
    RGBColor(0xf2, 0x8e, 0x2b),
    RGBColor(0x59, 0xa1, 0x4f),
    RGBColor(0xb0, 0x7a, 0xa1),
    RGBColor(0xe1, 0x57, 0x59),
    RGBColor(0x9c, 0x75, 0x5f),
    RGBColor(0x76, 0xb7, 0xb2),
    RGBColor(0xed, 0xc9, 0x48),
    RGBColor(0xff, 0x9d, 0xa7),
];

// Group charts.
const TITLE_H: u32 = 64;
const LEGEND_COLUMNS: usize = 4;
const LEGEND_ROW_H: u32 = 32;
const HEADER_GAP: u32 = 16;
const PANEL_H: u32 = 400;
const BOTTOM_MARGIN: u32 = 20;

// Ratio chart.
const PANEL_HEAD_H: u32 = 48;
const GROUP_ROW_H: u32 = 30;
const ROW_H: u32 = 28;
const AXIS_H: u32 = 44;
const PANEL_GAP: u32 = 28;
const LABEL_RIGHT: i32 = 500;
const PLOT_LEFT: i32 = 560;
const PLOT_RIGHT: i32 = WIDTH as i32 - 250;

type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;

/// File name of the chart of `group`.
pub fn group_file_name(group: &str) -> String {
    format!("peers-{group}.png")
}

/// Registers the chart font (a TrueType or OpenType file) as the sans-serif family,
/// with `NAME-Bold.EXT` beside it, when present, as its bold style.
pub fn register_font(path: Option<&Path>) -> Result<()> {
    let path = path.map_or_else(|| PathBuf::from(DEFAULT_FONT), Path::to_path_buf);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && path == Path::new(DEFAULT_FONT) => {
            return Err(anyhow!(
                "the charts need the font {DEFAULT_FONT}: install it (Debian: \
                 `apt-get install fonts-dejavu-core`) or name a TrueType font with --font"
            ));
        }
        Err(e) => return Err(e).with_context(|| format!("reading the font {}", path.display())),
    };
    register(&path, FontStyle::Normal, bytes)?;
    let bold = match (path.file_stem(), path.extension()) {
        (Some(stem), Some(ext)) => path.with_file_name(format!(
            "{}-Bold.{}",
            stem.to_string_lossy(),
            ext.to_string_lossy()
        )),
        _ => return Ok(()),
    };
    // Without a bold face, bold text falls back to the regular one.
    if let Ok(bytes) = std::fs::read(&bold) {
        register(&bold, FontStyle::Bold, bytes)?;
    }
    Ok(())
}

fn register(path: &Path, style: FontStyle, bytes: Vec<u8>) -> Result<()> {
    // plotters keeps fonts for the life of the process and wants them 'static.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font(FAMILY, style, bytes).map_err(|_| {
        anyhow!(
            "{} is not a TrueType or OpenType font that can be read",
            path.display()
        )
    })
}

/// One color per system, stable across all charts: blues for flyfs, gray for the
/// reference, other hues for the peers.
fn system_colors(data: &Dataset) -> Vec<RGBColor> {
    let (mut flyfs, mut peers) = (0, 0);
    data.systems
        .iter()
        .map(|s| match s.role {
            Role::Reference => REFERENCE_COLOR,
            Role::Flyfs => {
                flyfs += 1;
                FLYFS_COLORS[(flyfs - 1) % FLYFS_COLORS.len()]
            }
            Role::Peer => {
                peers += 1;
                PEER_COLORS[(peers - 1) % PEER_COLORS.len()]
            }
        })
        .collect()
}

fn style(size: u32, bold: bool, color: RGBColor, h: HPos) -> TextStyle<'static> {
    let font_style = if bold {
        FontStyle::Bold
    } else {
        FontStyle::Normal
    };
    (FAMILY, size, font_style)
        .into_font()
        .color(&color)
        .pos(Pos::new(h, VPos::Top))
}

/// Draws `text` with its capitals centred on `y`, aligned on `x` as the style's anchor
/// says.
fn text(area: &Area<'_>, text: &str, x: i32, y: i32, style: &TextStyle<'_>) -> Result<()> {
    // The ab_glyph font puts the baseline half a size below the top of the text box;
    // DejaVu's capitals are 0.73 of the size tall.
    let size = style.font.get_size();
    let top = y as f64 + 0.365 * size - 0.5 * size;
    area.draw_text(text, style, (x, top.round() as i32))?;
    Ok(())
}

fn text_width(area: &Area<'_>, text: &str, style: &TextStyle<'_>) -> Result<u32> {
    Ok(area.estimate_text_size(text, style)?.0)
}

/// The largest size from `max` down to `min` at which `text` fits in `width` pixels.
fn fitting_size(
    area: &Area<'_>,
    text: &str,
    bold: bool,
    max: u32,
    min: u32,
    width: u32,
) -> Result<u32> {
    for size in (min..=max).rev() {
        if text_width(area, text, &style(size, bold, INK, HPos::Left))? <= width {
            return Ok(size);
        }
    }
    Ok(min)
}

/// `text` cut with an ellipsis to fit in `width` pixels.
fn clip(area: &Area<'_>, text: &str, style: &TextStyle<'_>, width: u32) -> Result<String> {
    if text_width(area, text, style)? <= width {
        return Ok(text.to_string());
    }
    let mut chars: Vec<char> = text.chars().collect();
    while !chars.is_empty() {
        chars.pop();
        let cut: String = chars.iter().collect::<String>().trim_end().to_string() + "…";
        if text_width(area, &cut, style)? <= width {
            return Ok(cut);
        }
    }
    Ok("…".to_string())
}

fn legend_rows(data: &Dataset) -> u32 {
    data.systems.len().div_ceil(LEGEND_COLUMNS) as u32
}

fn grid(workloads: usize) -> (usize, usize) {
    let columns = match workloads {
        0 | 1 => 1,
        2 | 4 => 2,
        _ => 3,
    };
    (workloads.div_ceil(columns).max(1), columns)
}

/// Size of the chart of a group of `workloads` workloads.
pub fn group_chart_size(data: &Dataset, workloads: usize) -> (u32, u32) {
    let (rows, _) = grid(workloads);
    let header = TITLE_H + legend_rows(data) * LEGEND_ROW_H + HEADER_GAP;
    (WIDTH, header + rows as u32 * PANEL_H + BOTTOM_MARGIN)
}

/// Draws the chart of one group into `path`.
pub fn group_chart(data: &Dataset, group: &Group, path: &Path) -> Result<()> {
    let size = group_chart_size(data, group.workloads.len());
    let root = BitMapBackend::new(path, size).into_drawing_area();
    root.fill(&WHITE)?;
    let colors = system_colors(data);

    let title = format!(
        "{}: peer benchmarks, {} run of {}, flyfs {}",
        group.name, data.mode, data.date, data.revision
    );
    let title_size = fitting_size(&root, &title, true, 28, 16, WIDTH - 60)?;
    text(
        &root,
        &title,
        30,
        32,
        &style(title_size, true, INK, HPos::Left),
    )?;

    let column_w = (WIDTH - 60) / LEGEND_COLUMNS as u32;
    let label_style = style(17, false, INK, HPos::Left);
    for (i, system) in data.systems.iter().enumerate() {
        let x = 30 + (i % LEGEND_COLUMNS) as i32 * column_w as i32;
        let y = TITLE_H as i32 + (i / LEGEND_COLUMNS) as i32 * LEGEND_ROW_H as i32 + 12;
        root.draw(&Rectangle::new(
            [(x, y - 9), (x + 20, y + 9)],
            colors[i].filled(),
        ))?;
        let label = clip(&root, &system.label, &label_style, column_w - 40)?;
        text(&root, &label, x + 30, y, &label_style)?;
    }

    let header = TITLE_H + legend_rows(data) * LEGEND_ROW_H + HEADER_GAP;
    let (_, body) = root.split_vertically(header);
    let (body, _) = body.split_vertically(size.1 - header - BOTTOM_MARGIN);
    let panels = body.split_evenly(grid(group.workloads.len()));
    for (panel, &w) in panels.iter().zip(&group.workloads) {
        bar_panel(&root, panel, data, w, &colors)?;
    }
    root.present()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// One workload: a bar per system with a value, "error" or "not run" in place of the
/// others.
fn bar_panel(
    root: &Area<'_>,
    area: &Area<'_>,
    data: &Dataset,
    w: usize,
    colors: &[RGBColor],
) -> Result<()> {
    let workload = &data.workloads[w];
    let area = area.margin(6, 6, 14, 14);
    let (width, _) = area.dim_in_pixel();
    let (head, plot) = area.split_vertically(58);
    let title_size = fitting_size(&head, &workload.title, true, 19, 12, width - 10)?;
    let title_style = style(title_size, true, INK, HPos::Center);
    let title = clip(&head, &workload.title, &title_style, width - 10)?;
    let center = width as i32 / 2;
    text(&head, &title, center, 16, &title_style)?;
    let better = if workload.higher_is_better {
        "higher is better"
    } else {
        "lower is better"
    };
    text(
        &head,
        &format!("{}, {better}", workload.unit),
        center,
        40,
        &style(15, false, MUTED, HPos::Center),
    )?;

    let n = data.systems.len();
    let max = (0..n)
        .filter_map(|s| data.value(s, w))
        .fold(0.0_f64, f64::max);
    let others = (0..n)
        .filter(|&s| data.systems[s].role != Role::Reference)
        .filter_map(|s| data.value(s, w))
        .fold(0.0_f64, f64::max);
    // The local file system can be a hundred times faster than every distributed one;
    // its bar is then cut (drawn with a break) so that the others stay readable.
    let cap = if others > 0.0 && max > 1.5 * others {
        others * 1.2
    } else {
        max
    };
    let top = if cap > 0.0 { cap * 1.15 } else { 1.0 };
    let mut chart = ChartBuilder::on(&plot)
        .margin_top(8)
        .margin_right(8)
        .x_label_area_size(6)
        .y_label_area_size(74)
        .build_cartesian_2d(0.0..n as f64, 0.0..top)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_labels(6)
        .y_label_formatter(&|v| format::axis(*v))
        .label_style((FAMILY, 14).into_font().color(&MUTED))
        .axis_style(MUTED)
        .bold_line_style(GRID)
        .light_line_style(TRANSPARENT)
        .draw()?;

    // One font size for every label above the bars: the largest at which all fit.
    let (plot_w, _) = chart.plotting_area().dim_in_pixel();
    let slot = plot_w / n as u32;
    let labels: Vec<String> = (0..n)
        .map(|s| match data.outcome(s, w) {
            Some(Outcome::Value { value, .. }) => format::value(*value),
            Some(Outcome::Error { .. }) => "error".to_string(),
            None => "not run".to_string(),
        })
        .collect();
    let mut label_size = 15;
    while label_size > 10
        && labels.iter().try_fold(false, |wide, l| {
            text_width(&plot, l, &style(label_size, false, INK, HPos::Left))
                .map(|t| wide || t + 4 > slot)
        })?
    {
        label_size -= 1;
    }

    for (s, label) in labels.iter().enumerate() {
        let x = s as f64;
        let (value, color) = match data.outcome(s, w) {
            Some(Outcome::Value { value, .. }) => (value.min(cap), INK),
            Some(Outcome::Error { .. }) => (0.0, ERROR),
            None => (0.0, MUTED),
        };
        if let Some(Outcome::Value { .. }) = data.outcome(s, w) {
            chart.draw_series(std::iter::once(Rectangle::new(
                [(x + 0.14, 0.0), (x + 0.86, value)],
                colors[s].filled(),
            )))?;
        }
        if data.value(s, w).is_some_and(|v| v > cap) {
            let (low, gap, slant) = (cap * 0.8, cap * 0.025, cap * 0.04);
            chart.draw_series(std::iter::once(Polygon::new(
                vec![
                    (x + 0.1, low),
                    (x + 0.9, low + slant),
                    (x + 0.9, low + slant + gap),
                    (x + 0.1, low + gap),
                ],
                WHITE.filled(),
            )))?;
        }
        // Pixel positions are the backend's, so the text goes on the whole image.
        let (px, py) = chart.backend_coord(&(x + 0.5, value));
        let above = 6 + (0.37 * f64::from(label_size)) as i32;
        text(
            root,
            label,
            px,
            py - above,
            &style(label_size, false, color, HPos::Center),
        )?;
    }
    Ok(())
}

/// The x axis of the ratio chart: linear from 0, or logarithmic when the ratios span
/// more than a factor of 8.
#[derive(Debug)]
struct Scale {
    log: bool,
    lo: f64,
    hi: f64,
}

impl Scale {
    fn new(comparisons: &[Comparison]) -> Self {
        let (mut lo, mut hi) = (1.0_f64, 1.0_f64);
        for row in comparisons.iter().flat_map(|c| &c.rows) {
            if let Row::Ratio { ratio, .. } = *row
                && ratio.is_finite()
                && ratio > 0.0
            {
                lo = lo.min(ratio);
                hi = hi.max(ratio);
            }
        }
        if hi / lo > 8.0 {
            // Room beyond the extremes for the values printed at the ends of the bars.
            Scale {
                log: true,
                lo: lo / 1.8,
                hi: hi * 1.8,
            }
        } else {
            Scale {
                log: false,
                lo: 0.0,
                hi: hi * 1.25,
            }
        }
    }

    /// The pixel column of ratio `r`; 0 and infinity land on the ends of the axis.
    fn x(&self, r: f64) -> i32 {
        let r = r.clamp(self.lo, self.hi);
        let f = if self.log {
            (r.ln() - self.lo.ln()) / (self.hi.ln() - self.lo.ln())
        } else {
            (r - self.lo) / (self.hi - self.lo)
        };
        PLOT_LEFT + (f * f64::from(PLOT_RIGHT - PLOT_LEFT)).round() as i32
    }

    /// Round values to mark on the axis: 1, 2, 5 times powers of ten on a log axis (powers
    /// of ten alone over many decades), even steps on a linear one.
    fn ticks(&self) -> Vec<f64> {
        let mut ticks = Vec::new();
        if self.log {
            let multiples: &[f64] = if (self.hi / self.lo).log10() > 3.5 {
                &[1.0]
            } else {
                &[1.0, 2.0, 5.0]
            };
            let first = self.lo.log10().floor() as i32;
            let last = self.hi.log10().ceil() as i32;
            for exponent in first..=last {
                for m in multiples {
                    let t = m * 10f64.powi(exponent);
                    if t >= self.lo && t <= self.hi {
                        ticks.push(t);
                    }
                }
            }
        } else {
            let step = [
                0.1, 0.2, 0.25, 0.5, 1.0, 2.0, 2.5, 5.0, 10.0, 20.0, 25.0, 50.0,
            ]
            .into_iter()
            .find(|step| self.hi / step <= 8.0)
            .unwrap_or(100.0);
            let mut i = 0.0;
            while i * step <= self.hi {
                ticks.push(i * step);
                i += 1.0;
            }
        }
        ticks
    }
}

/// Size of the ratio chart with `panels` compared flyfs configurations.
pub fn ratio_chart_size(data: &Dataset, panels: usize) -> (u32, u32) {
    let panel = PANEL_HEAD_H
        + data.groups.len() as u32 * GROUP_ROW_H
        + data.workloads.len() as u32 * ROW_H
        + AXIS_H
        + PANEL_GAP;
    (WIDTH, TITLE_H + panels as u32 * panel)
}

/// Draws flyfs's ratios to the best peer of equal copies into `path`, a panel per
/// compared flyfs configuration, on one shared axis.
pub fn ratio_chart(data: &Dataset, comparisons: &[Comparison], path: &Path) -> Result<()> {
    let size = ratio_chart_size(data, comparisons.len());
    let root = BitMapBackend::new(path, size).into_drawing_area();
    root.fill(&WHITE)?;
    let scale = Scale::new(comparisons);

    let title = "flyfs ÷ the best peer keeping as many copies, per workload (above 1: flyfs ahead)";
    let title_size = fitting_size(&root, title, true, 26, 16, WIDTH - 60)?;
    text(
        &root,
        title,
        30,
        24,
        &style(title_size, true, INK, HPos::Left),
    )?;
    let axis = if scale.log {
        "logarithmic axis"
    } else {
        "linear axis"
    };
    let subtitle = format!(
        "{} run of {}, flyfs {}; rates: flyfs ÷ peer, latencies and times: peer ÷ flyfs; {axis}",
        data.mode, data.date, data.revision
    );
    text(
        &root,
        &subtitle,
        30,
        50,
        &style(15, false, MUTED, HPos::Left),
    )?;

    let mut top = TITLE_H as i32;
    for c in comparisons {
        top = ratio_panel(&root, data, c, &scale, top)?;
    }
    root.present()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// One flyfs configuration, drawn from `top` down; returns the top of the next panel.
fn ratio_panel(
    root: &Area<'_>,
    data: &Dataset,
    c: &Comparison,
    scale: &Scale,
    top: i32,
) -> Result<i32> {
    let peers: Vec<&str> = c
        .peers
        .iter()
        .map(|&p| data.systems[p].label.as_str())
        .collect();
    let caption = format!(
        "{} against {} ({})",
        data.systems[c.flyfs].label,
        peers.join(", "),
        copies_text(c.copies)
    );
    let caption_style = style(20, true, INK, HPos::Left);
    let caption = clip(root, &caption, &caption_style, WIDTH - 60)?;
    text(root, &caption, 30, top + 24, &caption_style)?;

    let rows_top = top + PANEL_HEAD_H as i32;
    let rows_bottom = rows_top
        + (data.groups.len() as u32 * GROUP_ROW_H + data.workloads.len() as u32 * ROW_H) as i32;

    // Shade every other workload row, under everything else.
    let mut y = rows_top;
    let mut shade = false;
    for group in &data.groups {
        y += GROUP_ROW_H as i32;
        for _ in &group.workloads {
            if shade {
                root.draw(&Rectangle::new(
                    [(20, y), (WIDTH as i32 - 20, y + ROW_H as i32)],
                    RGBColor(0xf4, 0xf4, 0xf4).filled(),
                ))?;
            }
            shade = !shade;
            y += ROW_H as i32;
        }
    }

    let tick_style = style(14, false, MUTED, HPos::Center);
    for t in scale.ticks() {
        let x = scale.x(t);
        root.draw(&PathElement::new(
            vec![(x, rows_top), (x, rows_bottom)],
            GRID,
        ))?;
        root.draw(&PathElement::new(
            vec![(x, rows_bottom), (x, rows_bottom + 5)],
            MUTED,
        ))?;
        text(root, &format::axis(t), x, rows_bottom + 18, &tick_style)?;
    }
    root.draw(&PathElement::new(
        vec![(PLOT_LEFT, rows_bottom), (PLOT_RIGHT, rows_bottom)],
        MUTED,
    ))?;

    let one = scale.x(1.0);
    let label_style = style(15, false, INK, HPos::Right);
    let value_left = style(14, true, INK, HPos::Left);
    let value_right = style(14, true, INK, HPos::Right);
    let peer_style = style(14, false, MUTED, HPos::Left);
    let reason_style = style(14, false, MUTED, HPos::Left);
    let mut y = rows_top;
    for group in &data.groups {
        text(
            root,
            &group.name,
            30,
            y + GROUP_ROW_H as i32 / 2 + 2,
            &style(16, true, INK, HPos::Left),
        )?;
        y += GROUP_ROW_H as i32;
        for &w in &group.workloads {
            let middle = y + ROW_H as i32 / 2;
            // With the unit: two rows may share a title (files/s and MiB/s of one run).
            let workload = &data.workloads[w];
            let title = clip(
                root,
                &format!("{} ({})", workload.title, workload.unit),
                &label_style,
                (LABEL_RIGHT - 50) as u32,
            )?;
            text(root, &title, LABEL_RIGHT, middle, &label_style)?;
            match c.rows[w] {
                Row::Ratio { ratio, peer, .. } => {
                    let x = scale.x(ratio);
                    let color = if ratio >= 1.0 { AHEAD } else { BEHIND };
                    root.draw(&Rectangle::new(
                        [(one.min(x), middle - 8), (one.max(x), middle + 8)],
                        color.filled(),
                    ))?;
                    let value = format::ratio(ratio);
                    if ratio >= 1.0 {
                        text(root, &value, x + 6, middle, &value_left)?;
                    } else {
                        text(root, &value, x - 6, middle, &value_right)?;
                    }
                    let peer = format!("vs {}", data.systems[peer].label);
                    let peer = clip(root, &peer, &peer_style, WIDTH - PLOT_RIGHT as u32 - 40)?;
                    text(root, &peer, PLOT_RIGHT + 20, middle, &peer_style)?;
                }
                row => {
                    let reason = row.reason().unwrap_or_default();
                    text(root, reason, one + 8, middle, &reason_style)?;
                }
            }
            y += ROW_H as i32;
        }
    }
    // Parity, over the bars.
    root.draw(&Rectangle::new(
        [(one - 1, rows_top - 4), (one + 1, rows_bottom)],
        INK.filled(),
    ))?;
    Ok(rows_bottom + (AXIS_H + PANEL_GAP) as i32)
}
