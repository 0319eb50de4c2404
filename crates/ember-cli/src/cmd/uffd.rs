//! `ember uffd` (being built: issue 4).

use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct UffdArgs {}

pub async fn run(_args: UffdArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`ember uffd` is not built yet")
}
