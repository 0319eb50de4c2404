//! The tiny test guest (`tests/guest/counter.S`): built with the system
//! assembler and linker at test time, and what its serial output means.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Must match counter.S.
pub const PATTERN_BASE: u64 = 0x40_0000;
pub const PATTERN_BYTES: u64 = 0x40_0000;
pub const PATTERN_STRIDE: u64 = 128;
pub const PATTERN_MUL: u64 = 0x9e37_79b9_7f4a_7c15;
/// The page holding the guest's counter.
pub const COUNTER_PAGE: u64 = 0x10_1000;

/// Guest memory the tests give the tiny guest.
pub const MEMORY_MIB: u32 = 32;

/// Assemble and link the guest into `dir/counter.elf`.
pub fn build(dir: &Path) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guest");
    let object = dir.join("counter.o");
    let elf = dir.join("counter.elf");
    let status = Command::new("as")
        .arg("--64")
        .arg("-o")
        .arg(&object)
        .arg(src.join("counter.S"))
        .status()
        .expect("run `as` (binutils)");
    assert!(status.success(), "assembling the test guest failed");
    let status = Command::new("ld")
        .args([
            "-m",
            "elf_x86_64",
            "-n",
            "-z",
            "noexecstack",
            "--no-warn-rwx-segments",
        ])
        .args(["--build-id=none", "-T"])
        .arg(src.join("counter.ld"))
        .arg("-o")
        .arg(&elf)
        .arg(&object)
        .status()
        .expect("run `ld` (binutils)");
    assert!(status.success(), "linking the test guest failed");
    elf
}

/// The checksum the guest prints when its pattern is intact.
pub fn expected_checksum() -> u64 {
    (PATTERN_BASE..PATTERN_BASE + PATTERN_BYTES)
        .step_by(PATTERN_STRIDE as usize)
        .map(|a| a.wrapping_mul(PATTERN_MUL) ^ a)
        .fold(0u64, |h, w| h.rotate_left(7).wrapping_add(w))
}

/// `(counter, checksum)` of every complete tick line.
pub fn ticks(serial: &str) -> Vec<(u64, u64)> {
    serial
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("tick=")?;
            let (tick, sum) = rest.split_once(" sum=")?;
            if tick.len() != 16 || sum.len() != 16 {
                return None;
            }
            Some((
                u64::from_str_radix(tick, 16).ok()?,
                u64::from_str_radix(sum, 16).ok()?,
            ))
        })
        .collect()
}

/// Assert `serial` is the guest's output from boot: banner, the fill line,
/// then ticks 1, 2, 3, … with the pattern intact every time. Returns the
/// last tick.
pub fn assert_continuous(serial: &str) -> u64 {
    let expected = expected_checksum();
    assert!(
        serial.starts_with("ember-test-guest\n"),
        "no banner in {serial:?}"
    );
    assert!(
        serial.contains(&format!("fill={expected:016x}\n")),
        "fill checksum is not {expected:016x} in {serial:?}"
    );
    let ticks = ticks(serial);
    assert!(!ticks.is_empty(), "no ticks in {serial:?}");
    for (i, (tick, sum)) in ticks.iter().enumerate() {
        assert_eq!(*tick, i as u64 + 1, "tick sequence broken in {serial:?}");
        assert_eq!(*sum, expected, "pattern damaged at tick {tick}");
    }
    // Every line but a last partial one is a tick line.
    let complete = serial.lines().count() - usize::from(!serial.ends_with('\n'));
    assert_eq!(complete, ticks.len() + 2, "unexpected lines in {serial:?}");
    ticks.last().expect("ticks").0
}

pub fn read(path: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).into_owned()
}

/// Wait until the guest printed at least `n` ticks; returns the last one.
pub fn wait_for_ticks(serial: &Path, n: u64, timeout: Duration) -> u64 {
    let start = Instant::now();
    loop {
        let text = read(serial);
        let last = ticks(&text).last().map(|t| t.0).unwrap_or(0);
        if last >= n {
            return last;
        }
        assert!(
            start.elapsed() < timeout,
            "guest printed {last} ticks, not {n}, within {timeout:?}: {text:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
