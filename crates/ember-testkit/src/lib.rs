//! Test support shared by Ember's crates.
//!
//! Tests that need root, KVM, a built guest image or a Firecracker binary
//! check for it first and, when it is missing, print why they skip and
//! return. They never pass silently: the reason lands in the test output
//! (`cargo nextest run --no-capture` or the failure log) with the word
//! `SKIPPED`, and `scripts/test` fails the run if a test skips for a reason
//! CI is expected to provide (see `EMBER_TEST_REQUIRE`).

use std::path::PathBuf;

/// Skip the current test with a reason unless `$cond` holds.
///
/// ```ignore
/// ember_testkit::require!(ember_testkit::is_root(), "needs root to create network namespaces");
/// ```
#[macro_export]
macro_rules! require {
    ($cond:expr, $($reason:tt)+) => {
        if !$cond {
            $crate::report_skip(module_path!(), &format!($($reason)+));
            return;
        }
    };
}

/// Print a skip line, or panic if the environment says this precondition
/// must hold (CI sets `EMBER_TEST_REQUIRE=all` so that nothing it provides is
/// skipped by accident).
pub fn report_skip(test: &str, reason: &str) {
    if std::env::var("EMBER_TEST_REQUIRE").as_deref() == Ok("all") && !optional(reason) {
        panic!("{test}: precondition missing but EMBER_TEST_REQUIRE=all: {reason}");
    }
    eprintln!("SKIPPED {test}: {reason}");
}

/// Preconditions CI cannot provide on its machines (a Firecracker binary,
/// reservable huge pages) are allowed to skip even under `EMBER_TEST_REQUIRE=all`.
fn optional(reason: &str) -> bool {
    reason.contains("EMBER_FIRECRACKER_BIN") || reason.contains("huge pages")
}

/// Are we root (needed for namespaces, TAP devices, nftables, userfaultfd)?
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The Firecracker binary to test against, from `EMBER_FIRECRACKER_BIN`.
pub fn firecracker_bin() -> Option<PathBuf> {
    let path = PathBuf::from(std::env::var_os("EMBER_FIRECRACKER_BIN")?);
    path.is_file().then_some(path)
}

/// The workspace's root directory (for finding built binaries and fixtures).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .and_then(|p| p.parent())
        .expect("ember-testkit lives at crates/ember-testkit")
        .to_path_buf()
}
