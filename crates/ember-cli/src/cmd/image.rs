//! `ember image …` (being built: issue 2).

use std::process::ExitCode;

#[derive(Debug, clap::Subcommand)]
pub enum ImageCommand {
    /// Build (or reuse the cached) guest kernel, initramfs and root filesystem.
    Build,
}

pub async fn run(_cmd: ImageCommand) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`ember image build` is not built yet")
}
