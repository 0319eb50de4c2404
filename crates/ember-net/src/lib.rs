//! Per-sandbox network slots: namespace, veth, TAP and nftables rules, planned as data and applied as root.
