//! The one parser of egress-rule CIDRs, shared by the API (which refuses a
//! bad rule with 400 before anything is placed) and the host agent (which
//! turns rules into nftables sets), so the two can never disagree.

use std::net::Ipv4Addr;

/// `a.b.c.d/len`, or a bare address meaning `/32`. IPv6 is refused (the
/// guest's IPv6 traffic is dropped), and so is a network with host bits set
/// (the error names the network meant). The error is the reason, for people.
pub fn parse_ipv4_cidr(s: &str) -> Result<(Ipv4Addr, u8), String> {
    let (addr, len) = match s.split_once('/') {
        Some((addr, len)) => (addr, Some(len)),
        None => (s, None),
    };
    if addr.contains(':') {
        return Err("IPv6 is not supported: all guest IPv6 traffic is dropped".to_owned());
    }
    let addr: Ipv4Addr = addr
        .parse()
        .map_err(|_| "expected an IPv4 address like 10.9.0.0/16".to_owned())?;
    let len = match len {
        None => 32,
        Some(len) => len
            .parse::<u8>()
            .ok()
            .filter(|l| *l <= 32)
            .ok_or_else(|| "prefix length must be a number 0..=32".to_owned())?,
    };
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    let network = Ipv4Addr::from(u32::from(addr) & mask);
    if network != addr {
        return Err(format!("host bits are set; write {network}/{len}"));
    }
    Ok((addr, len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_parse_or_say_why_not() {
        assert_eq!(
            parse_ipv4_cidr("10.9.0.0/16"),
            Ok((Ipv4Addr::new(10, 9, 0, 0), 16))
        );
        assert_eq!(
            parse_ipv4_cidr("1.1.1.1"),
            Ok((Ipv4Addr::new(1, 1, 1, 1), 32))
        );
        assert_eq!(parse_ipv4_cidr("0.0.0.0/0"), Ok((Ipv4Addr::UNSPECIFIED, 0)));
        assert!(
            parse_ipv4_cidr("2001:db8::/32")
                .unwrap_err()
                .contains("IPv6")
        );
        assert_eq!(
            parse_ipv4_cidr("10.9.1.0/16").unwrap_err(),
            "host bits are set; write 10.9.0.0/16"
        );
        assert!(
            parse_ipv4_cidr("10.0.0.0/33")
                .unwrap_err()
                .contains("0..=32")
        );
        assert!(parse_ipv4_cidr("example.com").unwrap_err().contains("IPv4"));
        assert!(parse_ipv4_cidr("").is_err());
    }
}
