//! The host-guest protocol: wire types of the guest agent's HTTP API and a client for it.
