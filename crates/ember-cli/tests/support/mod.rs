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

pub mod agent;
pub mod cli_server;
pub mod server;
