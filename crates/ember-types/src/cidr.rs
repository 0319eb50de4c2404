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

/// Destinations a sandbox may not reach unless a rule opens them — and
/// that a tenant's rule may open only where the operator granted it (see
/// [`EgressCeiling`]): (network, prefix length, what it is).
pub const SPECIAL_RANGES: [(Ipv4Addr, u8, &str); 9] = [
    (Ipv4Addr::new(0, 0, 0, 0), 8, "\"this network\""),
    (Ipv4Addr::new(10, 0, 0, 0), 8, "private"),
    (
        Ipv4Addr::new(100, 64, 0, 0),
        10,
        "shared (carrier-grade NAT)",
    ),
    (Ipv4Addr::new(127, 0, 0, 0), 8, "loopback"),
    (
        Ipv4Addr::new(169, 254, 0, 0),
        16,
        "link-local (cloud instance metadata)",
    ),
    (Ipv4Addr::new(172, 16, 0, 0), 12, "private"),
    (Ipv4Addr::new(192, 168, 0, 0), 16, "private"),
    (Ipv4Addr::new(224, 0, 0, 0), 4, "multicast"),
    (Ipv4Addr::new(240, 0, 0, 0), 4, "reserved"),
];

/// First and last address of a network.
fn range(addr: Ipv4Addr, len: u8) -> (u32, u32) {
    let start = u32::from(addr);
    let size = if len == 0 {
        u32::MAX
    } else {
        (1u32 << (32 - len)) - 1
    };
    (start, start | size)
}

/// What the operator lets tenants open: a tenant's `allow_out` may reach
/// into the special ranges only inside these grants. Everything else (the
/// public internet) is open by default and needs no grant.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EgressCeiling {
    /// Merged, sorted, inclusive address ranges.
    granted: Vec<(u32, u32)>,
    /// The grants as written, for messages.
    written: Vec<String>,
}

impl EgressCeiling {
    /// From the operator's grants (`10.1.0.0/16`, …); the error names the
    /// bad one.
    pub fn new<S: AsRef<str>>(grants: &[S]) -> Result<EgressCeiling, String> {
        let mut ranges = Vec::new();
        let mut written = Vec::new();
        for g in grants {
            let g = g.as_ref().trim();
            let (addr, len) = parse_ipv4_cidr(g).map_err(|e| format!("egress grant {g:?}: {e}"))?;
            ranges.push(range(addr, len));
            written.push(g.to_owned());
        }
        ranges.sort_unstable();
        let mut granted: Vec<(u32, u32)> = Vec::new();
        for (s, e) in ranges {
            match granted.last_mut() {
                Some(last) if s <= last.1.saturating_add(1) => last.1 = last.1.max(e),
                _ => granted.push((s, e)),
            }
        }
        Ok(EgressCeiling { granted, written })
    }

    pub fn grants(&self) -> &[String] {
        &self.written
    }

    fn covers(&self, (s, e): (u32, u32)) -> bool {
        self.granted.iter().any(|&(gs, ge)| gs <= s && e <= ge)
    }

    /// Is an `allow_out` rule within the ceiling? If not, the reason names
    /// the special range it reaches into without a grant.
    pub fn check(&self, rule: &str) -> Result<(), String> {
        let (addr, len) = parse_ipv4_cidr(rule)?;
        for (net, net_len, what) in SPECIAL_RANGES {
            // Two networks overlap only if one holds the other; the
            // overlap is the smaller one.
            let (rule_range, net_range) = (range(addr, len), range(net, net_len));
            let overlaps = rule_range.0 <= net_range.1 && net_range.0 <= rule_range.1;
            let (o_addr, o_len, overlap) = if len >= net_len {
                (addr, len, rule_range)
            } else {
                (net, net_len, net_range)
            };
            if overlaps && !self.covers(overlap) {
                return Err(format!(
                    "it opens {o_addr}/{o_len} ({what} addresses), which this server does not let \
                     sandboxes reach; the public internet needs no allow_out rule, and the \
                     operator can grant a range with `ember server --egress-grant CIDR`"
                ));
            }
        }
        Ok(())
    }
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

    #[test]
    fn the_ceiling_holds_special_ranges_back_unless_granted() {
        let none = EgressCeiling::new::<&str>(&[]).unwrap();
        assert_eq!(none.check("8.8.8.8"), Ok(()));
        assert_eq!(none.check("198.51.100.0/24"), Ok(()));
        for bad in [
            "169.254.169.254",
            "10.0.0.0/8",
            "10.9.0.0/16",
            "192.168.1.1",
            "0.0.0.0/0",
        ] {
            let e = none.check(bad).unwrap_err();
            assert!(e.contains("--egress-grant"), "{bad}: {e}");
        }
        assert!(
            none.check("169.254.169.254")
                .unwrap_err()
                .contains("metadata")
        );
        // The whole internet names the first special range it holds.
        assert!(none.check("0.0.0.0/0").unwrap_err().contains("0.0.0.0/8"));

        let some =
            EgressCeiling::new(&["10.1.0.0/16", "10.2.0.0/16", "169.254.169.254/32"]).unwrap();
        assert_eq!(some.check("10.1.2.0/24"), Ok(()));
        assert_eq!(some.check("10.1.0.0/16"), Ok(()));
        assert!(some.check("10.0.0.0/14").is_err());
        // Adjacent grants merge: 10.1/16 + 10.2/16 do not cover 10.0/15 …
        assert!(some.check("10.0.0.0/15").is_err());
        // … but 10.2.0.0/15 is 10.2–10.3, only half granted.
        assert!(some.check("10.2.0.0/15").is_err());
        assert_eq!(some.check("169.254.169.254"), Ok(()));
        assert!(some.check("169.254.0.0/16").is_err());
        let adjacent = EgressCeiling::new(&["10.0.0.0/9", "10.128.0.0/9"]).unwrap();
        assert_eq!(adjacent.check("10.0.0.0/8"), Ok(()));
        // Everything granted: anything goes.
        let all = EgressCeiling::new(&["0.0.0.0/0"]).unwrap();
        assert_eq!(all.check("0.0.0.0/0"), Ok(()));
        assert!(
            EgressCeiling::new(&["10.0.0.1/8"])
                .unwrap_err()
                .contains("egress grant")
        );
    }
}
