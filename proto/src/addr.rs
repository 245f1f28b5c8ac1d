//! Network addresses as flyfs stores and sends them: `host:port` strings.
//!
//! A storage node's address is persisted in the cluster record and sent to
//! every client in each routing reply, so one bad registration would reach
//! every process of the cluster. An address is therefore checked where it
//! enters (registration): its length is capped, and it must be a host (a DNS
//! name, an IPv4 address, or an IPv6 address in brackets) and a port. Names
//! are not resolved here: that is the network's business, at connect time.

use std::net::{Ipv4Addr, Ipv6Addr};

/// The longest address accepted: a 253-byte DNS name, `:`, a 5-digit port,
/// with room for an IPv6 literal's brackets.
pub const ADDRESS_BYTES_MAX: usize = 261;

/// What is wrong with an address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error("the address is empty")]
    Empty,
    #[error(
        "the address is {len} bytes long, over the limit address_bytes_max = {ADDRESS_BYTES_MAX}"
    )]
    TooLong { len: usize },
    #[error("the address {addr:?} has no port (expected host:port)")]
    NoPort { addr: String },
    #[error("the address {addr:?} has a bad port (expected 1 to 65535)")]
    BadPort { addr: String },
    #[error("the address {addr:?} has a bad host: {reason}")]
    BadHost { addr: String, reason: &'static str },
}

/// Checks that `addr` is `host:port` within [`ADDRESS_BYTES_MAX`]; returns
/// the host and the port.
pub fn parse_address(addr: &str) -> Result<(&str, u16), AddressError> {
    if addr.is_empty() {
        return Err(AddressError::Empty);
    }
    if addr.len() > ADDRESS_BYTES_MAX {
        return Err(AddressError::TooLong { len: addr.len() });
    }
    let owned = || addr.to_string();
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| AddressError::NoPort { addr: owned() })?;
    let bad_host = |reason| AddressError::BadHost {
        addr: owned(),
        reason,
    };
    // Digits only, no leading zero: `u16::from_str` would also take `+80`
    // and `0080`, which no address should carry.
    let port = match port.parse::<u16>() {
        Ok(number) if number > 0 && number.to_string() == port => number,
        _ => return Err(AddressError::BadPort { addr: owned() }),
    };
    if let Some(inner) = host.strip_prefix('[') {
        let inner = inner
            .strip_suffix(']')
            .ok_or_else(|| bad_host("an IPv6 address must be closed with ']'"))?;
        inner
            .parse::<Ipv6Addr>()
            .map_err(|_| bad_host("not an IPv6 address"))?;
        return Ok((host, port));
    }
    if host.parse::<Ipv4Addr>().is_ok() {
        return Ok((host, port));
    }
    check_dns_name(host).map_err(bad_host)?;
    Ok((host, port))
}

fn check_dns_name(host: &str) -> Result<(), &'static str> {
    if host.is_empty() {
        return Err("the host is empty");
    }
    if host.len() > 253 {
        return Err("a DNS name is at most 253 bytes");
    }
    if host.contains(':') {
        return Err("an IPv6 address must be written in brackets");
    }
    for label in host.strip_suffix('.').unwrap_or(host).split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err("each label of a DNS name is 1 to 63 bytes");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("a label of a DNS name neither starts nor ends with '-'");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err("a DNS name holds letters, digits, '-', '_' and '.' only");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_addresses_parse() {
        for (addr, host, port) in [
            ("127.0.0.1:7000", "127.0.0.1", 7000),
            ("storage-1:9000", "storage-1", 9000),
            ("node_3.rack.example.com.:1", "node_3.rack.example.com.", 1),
            ("[::1]:65535", "[::1]", 65535),
            ("[fe80::1:2]:80", "[fe80::1:2]", 80),
        ] {
            assert_eq!(parse_address(addr), Ok((host, port)), "{addr}");
        }
    }

    #[test]
    fn bad_addresses_say_what_is_wrong() {
        let long = format!("{}:80", "a".repeat(ADDRESS_BYTES_MAX));
        assert_eq!(
            parse_address(&long),
            Err(AddressError::TooLong { len: long.len() })
        );
        assert!(
            AddressError::TooLong { len: 300 }
                .to_string()
                .contains("address_bytes_max = 261")
        );
        assert_eq!(parse_address(""), Err(AddressError::Empty));
        for addr in [
            "host",
            "host:",
            "host:0",
            "host:65536",
            "host:+80",
            "host:0080",
            "host:x",
        ] {
            assert!(
                matches!(
                    parse_address(addr),
                    Err(AddressError::NoPort { .. } | AddressError::BadPort { .. })
                ),
                "{addr}: {:?}",
                parse_address(addr)
            );
        }
        for addr in [
            ":80",
            "::1:80",
            "[::1:80",
            "[nonsense]:80",
            "-host:80",
            "a..b:80",
            "host\u{1b}[31m:80",
            "héllo:80",
            "a b:80",
        ] {
            assert!(
                matches!(parse_address(addr), Err(AddressError::BadHost { .. })),
                "{addr}: {:?}",
                parse_address(addr)
            );
        }
        let label = format!("{}.com:80", "a".repeat(64));
        assert!(matches!(
            parse_address(&label),
            Err(AddressError::BadHost { .. })
        ));
    }
}
