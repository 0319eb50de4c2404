//! The guest's fixed network identity.
//!
//! Every sandbox's guest has the same IP and MAC address, each inside its own
//! network namespace. A snapshot records them, so a build restores into any
//! network slot of any host without the guest noticing.

use std::net::Ipv4Addr;

/// The guest's address on its only interface (`eth0`).
pub const GUEST_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 0, 21);
/// The host side of the TAP device inside the sandbox's namespace; the guest's gateway.
pub const GATEWAY_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 0, 22);
/// Prefix length of the guest↔TAP link.
pub const GUEST_PREFIX_LEN: u8 = 30;
/// The guest's MAC address (locally administered, unicast).
pub const GUEST_MAC: [u8; 6] = [0x02, 0xfc, 0x00, 0x00, 0x00, 0x01];
/// The MAC address of `tap0`, the guest's gateway (locally administered,
/// unicast). Fixed like the guest's own, so a restored guest's neighbour
/// cache is right on whichever slot it lands: a new random MAC would leave
/// it sending to the old one until its entry goes stale (tens of seconds).
pub const GATEWAY_MAC: [u8; 6] = [0x02, 0xfc, 0x00, 0x00, 0x00, 0x02];
/// Name of the TAP device inside every sandbox namespace.
pub const TAP_NAME: &str = "tap0";
/// TCP port of the guest agent (`ember-guest`).
pub const AGENT_PORT: u16 = 49983;
/// Hostname the guest sets for itself.
pub const GUEST_HOSTNAME: &str = "ember";

/// `GUEST_MAC` as `02:fc:00:00:00:01`.
pub fn guest_mac_string() -> String {
    mac_string(&GUEST_MAC)
}

/// A MAC address in the usual `aa:bb:cc:dd:ee:ff` form.
pub fn mac_string(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_string_is_colon_separated_lowercase_hex() {
        assert_eq!(guest_mac_string(), "02:fc:00:00:00:01");
    }
}
