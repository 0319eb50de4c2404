// Each test binary uses a part of the support code.
#![allow(dead_code)]

/// Skip (or, under `EMBER_TEST_REQUIRE`, fail) a test that needs root and
/// a built guest image to boot real VMs.
#[allow(unused_macros)]
macro_rules! require_vm {
    () => {
        ember_testkit::require!(
            ember_testkit::is_root(),
            "needs root for network namespaces and TAP devices"
        );
        ember_testkit::require!(
            support::agent::image_dir().is_some(),
            "no guest image under {}: run `ember image build` first",
            support::agent::data_dir().display()
        );
    };
}

/// Skip (or fail) a test that imports container images: it needs root to
/// keep file ownership and a static ember-guest to put into them.
#[allow(unused_macros)]
macro_rules! require_import {
    () => {
        ember_testkit::require!(
            ember_testkit::is_root(),
            "needs root to keep file ownership"
        );
        ember_testkit::require!(
            support::images::static_guest().is_some_and(|p| p.is_file()),
            "no static ember-guest: run `scripts/build-guest` and set EMBER_STATIC_GUEST_BIN"
        );
    };
}

pub mod agent;
pub mod cli_server;
pub mod images;
pub mod server;
