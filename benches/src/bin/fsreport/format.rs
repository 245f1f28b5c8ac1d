//! Numbers and messages as the report and the charts print them.

/// A measured value: three significant digits below 1000 (`512`, `51.2`, `0.0512`),
/// whole numbers with thousands separators from 1000 on (`1,634`, `100,221`).
pub fn value(v: f64) -> String {
    if v == 0.0 {
        return "0".to_string();
    }
    if v.abs().round() >= 1000.0 {
        return thousands(v.round());
    }
    // The exponent of the value rounded to three significant digits, so that 99.96
    // prints as `100`, not `100.0`.
    let exponent = format!("{v:.2e}")
        .split_once('e')
        .and_then(|(_, e)| e.parse::<i32>().ok())
        .unwrap_or(0);
    let decimals = (2 - exponent).max(0) as usize;
    format!("{v:.decimals$}")
}

/// An axis label: like [`value`] without trailing zeros (`0.05`, `2.5`, `20`, `1,000`).
pub fn axis(v: f64) -> String {
    let s = value(v);
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// A whole number with `,` between groups of three digits.
fn thousands(v: f64) -> String {
    let digits = format!("{:.0}", v.abs());
    let mut out = String::with_capacity(digits.len() + digits.len() / 3 + 1);
    if v < 0.0 {
        out.push('-');
    }
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A ratio of flyfs to a peer: two decimals between 0.1 and 10, fewer above, three
/// significant digits below. A ratio under 1 never prints as `1.00`.
pub fn ratio(r: f64) -> String {
    if r.is_infinite() {
        return "∞".to_string();
    }
    if r >= 100.0 {
        format!("{r:.0}")
    } else if r >= 10.0 {
        format!("{r:.1}")
    } else if (0.995..1.0).contains(&r) {
        "0.99".to_string()
    } else if r >= 0.1 || r == 0.0 {
        format!("{r:.2}")
    } else {
        value(r)
    }
}

/// A message on one line (whitespace runs become one space), cut to `max` characters
/// with an ellipsis.
pub fn one_line(text: &str, max: usize) -> String {
    let line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if line.chars().count() <= max {
        return line;
    }
    let mut cut: String = line.chars().take(max.saturating_sub(1)).collect();
    cut.truncate(cut.trim_end().len());
    cut.push('…');
    cut
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values() {
        assert_eq!(value(0.0), "0");
        assert_eq!(value(512.3), "512");
        assert_eq!(value(51.23), "51.2");
        assert_eq!(value(5.126), "5.13");
        assert_eq!(value(0.05126), "0.0513");
        assert_eq!(value(99.96), "100");
        assert_eq!(value(999.6), "1,000");
        assert_eq!(value(1634.2), "1,634");
        assert_eq!(value(100221.0), "100,221");
        assert_eq!(value(1234567.0), "1,234,567");
    }

    #[test]
    fn axis_labels() {
        assert_eq!(axis(0.01), "0.01");
        assert_eq!(axis(0.25), "0.25");
        assert_eq!(axis(1.0), "1");
        assert_eq!(axis(2.5), "2.5");
        assert_eq!(axis(20.0), "20");
        assert_eq!(axis(100.0), "100");
        assert_eq!(axis(20000.0), "20,000");
    }

    #[test]
    fn ratios() {
        assert_eq!(ratio(1.1259), "1.13");
        assert_eq!(ratio(0.997), "0.99");
        assert_eq!(ratio(1.0), "1.00");
        assert_eq!(ratio(0.0123), "0.0123");
        assert_eq!(ratio(12.34), "12.3");
        assert_eq!(ratio(250.4), "250");
        assert_eq!(ratio(0.0), "0.00");
        assert_eq!(ratio(f64::INFINITY), "∞");
    }

    #[test]
    fn one_line_cuts() {
        assert_eq!(one_line("a\n  b\tc", 10), "a b c");
        assert_eq!(one_line("abcdef ghij", 8), "abcdef…");
        assert_eq!(one_line("ééééé", 3), "éé…");
    }
}
