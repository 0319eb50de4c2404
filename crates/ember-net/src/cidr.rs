//! IPv4 prefixes (`10.9.0.0/16`) and sets of them, as nftables sees them.
//!
//! Owns parsing and address arithmetic. IPv6 is not modelled: v1 drops all
//! guest IPv6, so an IPv6 egress rule could never take effect and is refused
//! at parse time instead of being silently ignored.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use crate::error::NetError;

/// An IPv4 network: an address whose host bits are zero, and a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ipv4Cidr {
    addr: Ipv4Addr,
    prefix_len: u8,
}

impl Ipv4Cidr {
    /// Fails if `prefix_len > 32` or `addr` has bits set below the prefix
    /// (`10.9.1.0/16` is almost always a typo for `10.9.0.0/16`; guessing
    /// which was meant could open or close more than the user asked for).
    pub fn new(addr: Ipv4Addr, prefix_len: u8) -> Result<Self, NetError> {
        let input = || format!("{addr}/{prefix_len}");
        if prefix_len > 32 {
            return Err(NetError::InvalidCidr {
                input: input(),
                reason: "prefix length must be 0..=32".into(),
            });
        }
        let cidr = Ipv4Cidr { addr, prefix_len };
        let network = Ipv4Addr::from(u32::from(addr) & cidr.mask());
        if network != addr {
            return Err(NetError::InvalidCidr {
                input: input(),
                reason: format!("host bits are set; write {network}/{prefix_len}"),
            });
        }
        Ok(cidr)
    }

    /// The /32 of one address.
    pub fn host(addr: Ipv4Addr) -> Self {
        Ipv4Cidr {
            addr,
            prefix_len: 32,
        }
    }

    /// For constants known to be valid.
    pub(crate) const fn new_unchecked(addr: Ipv4Addr, prefix_len: u8) -> Self {
        Ipv4Cidr { addr, prefix_len }
    }

    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    fn mask(&self) -> u32 {
        u32::MAX
            .checked_shl(32 - u32::from(self.prefix_len))
            .unwrap_or(0)
    }

    /// First and last address, inclusive.
    pub fn range(&self) -> (u32, u32) {
        let first = u32::from(self.addr);
        (first, first | !self.mask())
    }

    /// Number of addresses (2^32 for `/0`, hence `u64`).
    pub fn size(&self) -> u64 {
        1u64 << (32 - u32::from(self.prefix_len))
    }

    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        u32::from(addr) & self.mask() == u32::from(self.addr)
    }

    pub fn overlaps(&self, other: &Ipv4Cidr) -> bool {
        let (a0, a1) = self.range();
        let (b0, b1) = other.range();
        a0 <= b1 && b0 <= a1
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

impl FromStr for Ipv4Cidr {
    type Err = NetError;

    /// `a.b.c.d/len`, or a bare address meaning `/32` (the rules are
    /// [`ember_types::cidr::parse_ipv4_cidr`]'s, which the API applies too).
    fn from_str(s: &str) -> Result<Self, NetError> {
        let (addr, prefix_len) =
            ember_types::cidr::parse_ipv4_cidr(s).map_err(|reason| NetError::InvalidCidr {
                input: s.to_string(),
                reason,
            })?;
        Ok(Ipv4Cidr { addr, prefix_len })
    }
}

impl serde::Serialize for Ipv4Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Ipv4Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A set of IPv4 addresses kept as sorted, disjoint, non-adjacent inclusive
/// ranges — the shape nftables itself reduces an interval set to, so the
/// rendered set reads back from `nft list` exactly as written.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AddrSet {
    ranges: Vec<(u32, u32)>,
}

impl AddrSet {
    pub fn new(cidrs: impl IntoIterator<Item = Ipv4Cidr>) -> Self {
        let mut ranges: Vec<(u32, u32)> = cidrs.into_iter().map(|c| c.range()).collect();
        ranges.sort_unstable();
        let mut merged: Vec<(u32, u32)> = Vec::with_capacity(ranges.len());
        for (start, end) in ranges {
            match merged.last_mut() {
                // Overlapping or touching (end + 1 == start) ranges fuse.
                Some(last) if u64::from(start) <= u64::from(last.1) + 1 => {
                    last.1 = last.1.max(end);
                }
                _ => merged.push((start, end)),
            }
        }
        AddrSet { ranges: merged }
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        let a = u32::from(addr);
        self.ranges.iter().any(|(s, e)| *s <= a && a <= *e)
    }

    /// Inclusive ranges, sorted.
    pub fn ranges(&self) -> &[(u32, u32)] {
        &self.ranges
    }

    /// One element as nftables prints it: an address, a prefix, or `a-b`.
    fn element(start: u32, end: u32) -> String {
        let first = Ipv4Addr::from(start);
        if start == end {
            return first.to_string();
        }
        let span = u64::from(end) - u64::from(start) + 1;
        if span.is_power_of_two() && u64::from(start) % span == 0 {
            let len = 32 - span.trailing_zeros();
            return format!("{first}/{len}");
        }
        format!("{first}-{}", Ipv4Addr::from(end))
    }
}

impl fmt::Display for AddrSet {
    /// `10.0.0.0/8` for one element, `{ 1.2.3.4, 10.0.0.0/8 }` for several.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let elements: Vec<String> = self
            .ranges
            .iter()
            .map(|(s, e)| AddrSet::element(*s, *e))
            .collect();
        match elements.as_slice() {
            [one] => f.write_str(one),
            many => write!(f, "{{ {} }}", many.join(", ")),
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn c(s: &str) -> Ipv4Cidr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_prefixes_and_bare_addresses() {
        assert_eq!(c("10.9.0.0/16").to_string(), "10.9.0.0/16");
        assert_eq!(c("1.2.3.4").to_string(), "1.2.3.4/32");
        assert_eq!(c("0.0.0.0/0").size(), 1 << 32);
        assert!(c("10.9.0.0/16").contains(Ipv4Addr::new(10, 9, 255, 1)));
        assert!(!c("10.9.0.0/16").contains(Ipv4Addr::new(10, 10, 0, 0)));
    }

    #[test]
    fn rejects_bad_input_saying_what_to_write() {
        let err = "10.9.1.0/16".parse::<Ipv4Cidr>().unwrap_err().to_string();
        assert!(err.contains("write 10.9.0.0/16"), "{err}");
        for bad in [
            "10.0.0.0/33",
            "10.0.0/8",
            "",
            "x/8",
            "10.0.0.0/",
            "10.0.0.0/-1",
        ] {
            assert!(bad.parse::<Ipv4Cidr>().is_err(), "{bad} parsed");
        }
        let err = "fd00::/8".parse::<Ipv4Cidr>().unwrap_err().to_string();
        assert!(err.contains("IPv6"), "{err}");
    }

    #[test]
    fn serde_is_the_string_form() {
        let json = serde_json::to_string(&c("10.9.0.0/16")).unwrap();
        assert_eq!(json, "\"10.9.0.0/16\"");
        let back: Ipv4Cidr = serde_json::from_str(&json).unwrap();
        assert_eq!(back, c("10.9.0.0/16"));
        assert!(serde_json::from_str::<Ipv4Cidr>("\"10.9.1.0/16\"").is_err());
    }

    #[test]
    fn set_renders_like_nft_list() {
        // The same reductions `nft list` showed for this input on nftables 1.0.6.
        let set = AddrSet::new(
            [
                "10.0.0.0/9",
                "10.128.0.0/9",
                "192.168.0.1",
                "192.168.0.2",
                "172.16.0.0/12",
                "1.2.3.4",
                "10.9.0.0/16",
            ]
            .map(c),
        );
        assert_eq!(
            set.to_string(),
            "{ 1.2.3.4, 10.0.0.0/8, 172.16.0.0/12, 192.168.0.1-192.168.0.2 }"
        );
        assert_eq!(AddrSet::new([c("10.0.0.0/8")]).to_string(), "10.0.0.0/8");
        assert_eq!(AddrSet::new([c("0.0.0.0/0")]).to_string(), "0.0.0.0/0");
        assert_eq!(
            AddrSet::new([c("255.255.255.255"), c("240.0.0.0/4")]).to_string(),
            "240.0.0.0/4"
        );
        assert!(AddrSet::new([]).is_empty());
    }

    fn arb_cidr() -> impl Strategy<Value = Ipv4Cidr> {
        (any::<u32>(), 0u8..=32).prop_map(|(a, len)| {
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            Ipv4Cidr::new(Ipv4Addr::from(a & mask), len).unwrap()
        })
    }

    proptest! {
        /// The merged set holds exactly the union of its inputs; checked at
        /// every input boundary (where merging could go wrong) and at random.
        #[test]
        fn set_is_the_union_of_its_cidrs(
            cidrs in prop::collection::vec(arb_cidr(), 0..12),
            probes in prop::collection::vec(any::<u32>(), 0..64),
        ) {
            let set = AddrSet::new(cidrs.clone());
            let mut points = probes;
            for c in &cidrs {
                let (s, e) = c.range();
                points.extend([s, e, s.wrapping_sub(1), e.wrapping_add(1)]);
            }
            for p in points {
                let addr = Ipv4Addr::from(p);
                let naive = cidrs.iter().any(|c| c.contains(addr));
                prop_assert_eq!(set.contains(addr), naive, "{}", addr);
            }
            for pair in set.ranges().windows(2) {
                // Disjoint and not adjacent, as nft would keep them.
                prop_assert!(u64::from(pair[0].1) + 1 < u64::from(pair[1].0));
            }
        }
    }
}
