//! Byte sizes on the command line: `4096`, `100KiB`, `4MiB`, `1GiB`, `2G`.
//!
//! Every unit is binary (K = KiB = 1024 bytes), as in fio and mdtest: the
//! workloads deal in block and file sizes, where decimal units are a trap.

/// Parses a byte count with an optional binary unit (`K`, `KiB`, `M`, `MiB`,
/// `G`, `GiB`, `T`, `TiB`, or `B` for plain bytes; the letter in either case).
///
/// The error is a sentence meant for the command line's user.
pub fn parse(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits);
    if number.is_empty() {
        return Err(format!(
            "'{text}' is not a size: expected a whole number of bytes with an optional unit, \
             such as 4096, 100KiB, 4MiB, 1GiB or 2G"
        ));
    }
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        "t" | "tib" => 40,
        _ => {
            return Err(format!(
                "'{text}' has an unknown unit '{unit}': use K/KiB, M/MiB, G/GiB or T/TiB \
                 (all binary: K = 1024 bytes)"
            ));
        }
    };
    let value: u64 = number
        .parse()
        .map_err(|_| format!("'{text}' is too large a size"))?;
    value
        .checked_mul(1u64 << shift)
        .ok_or_else(|| format!("'{text}' is too large a size"))
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn plain_bytes_and_binary_units() {
        assert_eq!(parse("4096"), Ok(4096));
        assert_eq!(parse("0"), Ok(0));
        assert_eq!(parse("17B"), Ok(17));
        assert_eq!(parse("100KiB"), Ok(100 * 1024));
        assert_eq!(parse("100k"), Ok(100 * 1024));
        assert_eq!(parse("4MiB"), Ok(4 << 20));
        assert_eq!(parse("4M"), Ok(4 << 20));
        assert_eq!(parse("1GiB"), Ok(1 << 30));
        assert_eq!(parse("2G"), Ok(2 << 30));
        assert_eq!(parse("2g"), Ok(2 << 30));
        assert_eq!(parse("3TiB"), Ok(3 << 40));
    }

    #[test]
    fn rejects_what_is_not_a_size() {
        for bad in [
            "", "KiB", "-1", "1.5G", "4 MiB", "4MB", "4Mi", "12X", "0x10",
        ] {
            let err = parse(bad).expect_err(bad);
            assert!(err.contains(bad.trim()), "{bad}: {err}");
        }
    }

    #[test]
    fn rejects_overflow() {
        assert!(parse("18446744073709551616").is_err());
        assert!(parse("20000000T").is_err());
        assert_eq!(parse("18446744073709551615"), Ok(u64::MAX));
    }
}
