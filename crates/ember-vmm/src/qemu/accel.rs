//! Choosing QEMU's accelerator, and the host facts TCG guests need.
//!
//! KVM is used only where it can run a stock Linux guest. A `/dev/kvm` that
//! opens is not enough: on a nested PVM hypervisor (`kvm_pvm`, as on Ember's
//! CI machines) QEMU starts but the guest hangs after real-mode setup, so
//! Ember asks which vendor module provides KVM. The decision is a pure
//! function of [`HostFacts`] so it is tested without the hardware.
//!
//! TCG guests on `microvm` have no HPET to calibrate the TSC against and hang
//! trying; they are told the host's TSC frequency with `tsc_early_khz=`.

use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{Result, VmmError};

/// The environment variable that overrides detection: `kvm` or `tcg`.
pub const ACCEL_ENV: &str = "EMBER_QEMU_ACCEL";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the configuration asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccelChoice {
    /// `EMBER_QEMU_ACCEL` if set, else detect.
    #[default]
    Auto,
    Kvm,
    Tcg,
}

/// The accelerator in use and why, for logs and build metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccelDecision {
    pub accel: Accel,
    pub reason: String,
}

impl fmt::Display for AccelDecision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.accel, self.reason)
    }
}

/// What detection looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFacts {
    /// `Err` says why `/dev/kvm` cannot be used (missing, no permission,
    /// unexpected API version).
    pub kvm_device: std::result::Result<(), String>,
    /// Loaded modules among `kvm_pvm`, `kvm_intel`, `kvm_amd`.
    pub kvm_modules: Vec<String>,
}

impl HostFacts {
    pub fn probe() -> HostFacts {
        let kvm_modules = ["kvm_pvm", "kvm_intel", "kvm_amd"]
            .into_iter()
            .filter(|m| Path::new("/sys/module").join(m).exists())
            .map(String::from)
            .collect();
        HostFacts {
            kvm_device: probe_kvm_device(),
            kvm_modules,
        }
    }
}

fn probe_kvm_device() -> std::result::Result<(), String> {
    use std::os::fd::AsRawFd;
    const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;
    const KVM_API_VERSION: libc::c_int = 12;
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(|e| format!("cannot open /dev/kvm: {e}"))?;
    // SAFETY: KVM_GET_API_VERSION takes no argument and only returns an int;
    // the descriptor is open for the duration of the call.
    let version = unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_GET_API_VERSION, 0) };
    if version != KVM_API_VERSION {
        return Err(format!(
            "/dev/kvm reports API version {version}, not {KVM_API_VERSION}"
        ));
    }
    Ok(())
}

/// Pick the accelerator: explicit configuration, then the environment
/// variable, then detection from `facts`.
pub fn decide(
    choice: AccelChoice,
    env: Option<&str>,
    facts: impl FnOnce() -> HostFacts,
) -> Result<AccelDecision> {
    let forced = |accel, by: &str| AccelDecision {
        accel,
        reason: format!("forced by {by}"),
    };
    match choice {
        AccelChoice::Kvm => return Ok(forced(Accel::Kvm, "configuration")),
        AccelChoice::Tcg => return Ok(forced(Accel::Tcg, "configuration")),
        AccelChoice::Auto => {}
    }
    match env.map(str::trim) {
        None | Some("") | Some("auto") => {}
        Some("kvm") => return Ok(forced(Accel::Kvm, ACCEL_ENV)),
        Some("tcg") => return Ok(forced(Accel::Tcg, ACCEL_ENV)),
        Some(other) => {
            return Err(VmmError::Config(format!(
                "{ACCEL_ENV}={other:?}: expected \"kvm\", \"tcg\" or \"auto\""
            )));
        }
    }
    let facts = facts();
    let tcg = |reason: String| {
        Ok(AccelDecision {
            accel: Accel::Tcg,
            reason,
        })
    };
    if let Err(why) = facts.kvm_device {
        return tcg(why);
    }
    let has = |m: &str| facts.kvm_modules.iter().any(|x| x == m);
    if has("kvm_pvm") {
        return tcg(
            "/dev/kvm is a nested PVM hypervisor (kvm_pvm), which cannot run stock Linux guests"
                .into(),
        );
    }
    match ["kvm_intel", "kvm_amd"].into_iter().find(|m| has(m)) {
        Some(vendor) => Ok(AccelDecision {
            accel: Accel::Kvm,
            reason: format!("/dev/kvm usable, hardware virtualisation by {vendor}"),
        }),
        None => tcg("/dev/kvm is not backed by kvm_intel or kvm_amd".into()),
    }
}

/// The host TSC frequency in kHz: the kernel's own calibration from the
/// kernel log when readable, else `cpu MHz` from `/proc/cpuinfo` (which on
/// hosts with frequency scaling may be the current, not the TSC, rate).
pub fn host_tsc_khz() -> Option<u32> {
    read_kmsg()
        .and_then(|log| tsc_khz_from_kernel_log(&log))
        .or_else(|| {
            let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
            tsc_khz_from_cpuinfo(&cpuinfo)
        })
}

/// Read what `/dev/kmsg` still holds, without blocking.
fn read_kmsg() -> Option<String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut kmsg = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/kmsg")
        .ok()?;
    let mut log = String::new();
    let mut record = [0u8; 8192];
    // One record per read; stop at the end (EAGAIN) or after a bounded number.
    for _ in 0..100_000 {
        match kmsg.read(&mut record) {
            Ok(0) => break,
            Ok(n) => {
                log.push_str(&String::from_utf8_lossy(&record[..n]));
                if !log.ends_with('\n') {
                    log.push('\n');
                }
            }
            // EPIPE: records were overwritten while reading; keep going.
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
            Err(_) => break,
        }
    }
    Some(log)
}

/// `tsc: Refined TSC clocksource calibration: 2299.999 MHz` wins over the
/// earlier `tsc: Detected 2299.998 MHz processor`.
pub fn tsc_khz_from_kernel_log(log: &str) -> Option<u32> {
    let find = |marker: &str| {
        log.lines().rev().find_map(|line| {
            let rest = &line[line.find(marker)? + marker.len()..];
            mhz_to_khz(rest.split_whitespace().next()?)
        })
    };
    find("tsc: Refined TSC clocksource calibration: ").or_else(|| find("tsc: Detected "))
}

/// The first `cpu MHz : 2299.998` line.
pub fn tsc_khz_from_cpuinfo(cpuinfo: &str) -> Option<u32> {
    cpuinfo.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        (key.trim() == "cpu MHz").then(|| mhz_to_khz(value.trim()))?
    })
}

/// "2299.998" → 2299998, without floating point.
fn mhz_to_khz(mhz: &str) -> Option<u32> {
    let (whole, frac) = mhz.split_once('.').unwrap_or((mhz, ""));
    if whole.is_empty() || !whole.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut khz: u32 = whole.parse::<u32>().ok()?.checked_mul(1000)?;
    let digits: Vec<u32> = frac.bytes().map(|b| u32::from(b - b'0')).collect();
    let milli = digits
        .iter()
        .chain([0, 0, 0].iter())
        .take(3)
        .fold(0, |acc, d| acc * 10 + d);
    khz = khz.checked_add(milli)?;
    // Round on the fourth decimal.
    if digits.get(3).is_some_and(|&d| d >= 5) {
        khz = khz.checked_add(1)?;
    }
    (khz > 0).then_some(khz)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(device: std::result::Result<(), &str>, modules: &[&str]) -> HostFacts {
        HostFacts {
            kvm_device: device.map_err(String::from),
            kvm_modules: modules.iter().map(|m| m.to_string()).collect(),
        }
    }

    #[test]
    fn detection_follows_what_kvm_can_run() {
        let d = decide(AccelChoice::Auto, None, || {
            facts(Err("cannot open /dev/kvm: No such file"), &[])
        })
        .unwrap();
        assert_eq!(d.accel, Accel::Tcg);
        assert!(d.reason.contains("cannot open"));

        let d = decide(AccelChoice::Auto, None, || facts(Ok(()), &["kvm_pvm"])).unwrap();
        assert_eq!(d.accel, Accel::Tcg);
        assert!(d.reason.contains("PVM"));

        let d = decide(AccelChoice::Auto, None, || facts(Ok(()), &["kvm_intel"])).unwrap();
        assert_eq!(d.accel, Accel::Kvm);
        let d = decide(AccelChoice::Auto, None, || facts(Ok(()), &["kvm_amd"])).unwrap();
        assert_eq!(d.accel, Accel::Kvm);

        let d = decide(AccelChoice::Auto, None, || facts(Ok(()), &[])).unwrap();
        assert_eq!(d.accel, Accel::Tcg);
    }

    #[test]
    fn configuration_beats_environment_beats_detection() {
        let never = || -> HostFacts { panic!("detection must not run when forced") };
        assert_eq!(
            decide(AccelChoice::Tcg, Some("kvm"), never).unwrap().accel,
            Accel::Tcg
        );
        assert_eq!(
            decide(AccelChoice::Kvm, None, never).unwrap().accel,
            Accel::Kvm
        );
        let d = decide(AccelChoice::Auto, Some("kvm"), never).unwrap();
        assert_eq!(d.accel, Accel::Kvm);
        assert!(d.reason.contains(ACCEL_ENV));
        let d = decide(AccelChoice::Auto, Some("auto"), || {
            facts(Ok(()), &["kvm_intel"])
        })
        .unwrap();
        assert_eq!(d.accel, Accel::Kvm);
        let err = decide(AccelChoice::Auto, Some("hvf"), never).unwrap_err();
        assert!(matches!(err, VmmError::Config(m) if m.contains("hvf") && m.contains("tcg")));
    }

    #[test]
    fn tsc_frequency_parsing() {
        let log = "6,1,54,-;tsc: Detected 2299.998 MHz processor\n\
                   6,2,900,-;clocksource: tsc: mask: 0xffffffffffffffff\n\
                   6,3,990,-;tsc: Refined TSC clocksource calibration: 2300.0004 MHz\n";
        assert_eq!(tsc_khz_from_kernel_log(log), Some(2_300_000));
        assert_eq!(
            tsc_khz_from_kernel_log("[0.000054] tsc: Detected 2299.998 MHz processor"),
            Some(2_299_998)
        );
        assert_eq!(tsc_khz_from_kernel_log("nothing here"), None);
        let cpuinfo =
            "processor\t: 0\nmodel name\t: Xeon\ncpu MHz\t\t: 2299.9985\ncache size\t: 1 KB\n";
        assert_eq!(tsc_khz_from_cpuinfo(cpuinfo), Some(2_299_999));
        assert_eq!(tsc_khz_from_cpuinfo("cpu MHz : 3000\n"), Some(3_000_000));
        assert_eq!(tsc_khz_from_cpuinfo("cpu MHz : fast\n"), None);
        assert_eq!(tsc_khz_from_cpuinfo("cpu MHz : -1.5\n"), None);
        assert_eq!(tsc_khz_from_cpuinfo("cpu MHz : 0.000\n"), None);
    }
}
