//! What an image build reports while it works, so the CLI can draw a line
//! per step and the host agent can log it.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// The steps of an image build, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Step {
    /// Resolve the kernel package to a version and hash the other inputs.
    Inputs,
    /// Download the kernel package and extract an uncompressed `vmlinux`.
    Kernel,
    /// Pick the guest's kernel modules and their dependencies.
    Modules,
    /// debootstrap and configure the root tree.
    RootTree,
    /// Write the initramfs.
    Initramfs,
    /// Pack the root tree and `ember-guest` into `rootfs.ext4`.
    Pack,
    /// Fetch a container image's manifest and blobs from a registry.
    Pull,
    /// Read and verify a container image's index, manifest and config.
    ImageManifest,
    /// Apply a container image's layers, in order, onto a fresh tree.
    Layers,
}

impl Step {
    pub fn label(self) -> &'static str {
        match self {
            Step::Inputs => "resolve inputs",
            Step::Kernel => "guest kernel",
            Step::Modules => "kernel modules",
            Step::RootTree => "root tree (debootstrap)",
            Step::Initramfs => "initramfs",
            Step::Pack => "pack rootfs.ext4",
            Step::Pull => "pull from registry",
            Step::ImageManifest => "image manifest",
            Step::Layers => "apply layers",
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// Another process is building; this one waits for its lock.
    WaitingForLock {
        lock: PathBuf,
    },
    Started(Step),
    /// A line of output from the tool a step runs, or a fact it found.
    Detail {
        step: Step,
        line: String,
    },
    Finished {
        step: Step,
        elapsed: Duration,
        /// The step's result came from the cache; nothing was rebuilt.
        cached: bool,
    },
}

/// Runs one step: reports its start, and its end with the elapsed time.
pub(crate) struct StepTimer<'a> {
    step: Step,
    start: std::time::Instant,
    progress: &'a mut dyn FnMut(Progress),
}

impl<'a> StepTimer<'a> {
    pub(crate) fn start(step: Step, progress: &'a mut dyn FnMut(Progress)) -> Self {
        progress(Progress::Started(step));
        StepTimer {
            step,
            start: std::time::Instant::now(),
            progress,
        }
    }

    pub(crate) fn detail(&mut self, line: impl Into<String>) {
        (self.progress)(Progress::Detail {
            step: self.step,
            line: line.into(),
        });
    }

    pub(crate) fn finish(self, cached: bool) {
        (self.progress)(Progress::Finished {
            step: self.step,
            elapsed: self.start.elapsed(),
            cached,
        });
    }
}

impl fmt::Debug for StepTimer<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StepTimer")
            .field("step", &self.step)
            .finish_non_exhaustive()
    }
}
