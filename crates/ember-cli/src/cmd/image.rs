//! `ember image …`: build (or reuse) the guest image — kernel, initramfs,
//! root filesystem — and show where the current one is. The pipeline is
//! `ember_image`'s; this module only parses arguments and draws progress.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use ember_image::{Image, ImageSpec, Progress};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Debug, clap::Subcommand)]
pub enum ImageCommand {
    /// Build (or reuse the cached) guest kernel, initramfs and root filesystem.
    Build(BuildArgs),
    /// Show the current image's files.
    Show(ShowArgs),
    /// Import a container image (from a registry, an OCI image layout or a
    /// `docker save` archive) as a root filesystem sandboxes can boot.
    Import(ImportArgs),
    /// List imported container images.
    List(ShowArgs),
}

#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    /// docker://HOST[:PORT]/REPOSITORY[:TAG|@DIGEST] (a registry),
    /// oci:DIR[:REF] (an OCI image layout) or docker-archive:FILE[:TAG].
    source: String,
    /// Registry user; the password is read from EMBER_REGISTRY_PASSWORD
    /// (never the command line).
    #[arg(long, env = "EMBER_REGISTRY_USERNAME")]
    registry_user: Option<String>,
    /// Reach the registry over plain HTTP (loopback or a trusted network).
    #[arg(long)]
    plain_http: bool,
    /// A PEM CA certificate to trust for the registry, besides the system's.
    #[arg(long, value_name = "FILE")]
    registry_ca: Vec<PathBuf>,
    /// Ember's data directory; imports go under <DATA_DIR>/images/oci.
    #[arg(long, env = "EMBER_DATA_DIR", default_value = "/var/lib/ember")]
    data_dir: PathBuf,
    /// A static ember-guest binary to boot the image with (see scripts/build-guest).
    #[arg(long, env = "EMBER_GUEST_BIN")]
    guest_bin: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct BuildArgs {
    /// Ember's data directory; images go under <DATA_DIR>/images.
    #[arg(long, env = "EMBER_DATA_DIR", default_value = "/var/lib/ember")]
    data_dir: PathBuf,
    /// The ember-guest binary to install as /sbin/init [default: `ember-guest`
    /// next to this executable].
    #[arg(long, env = "EMBER_GUEST_BIN")]
    guest_bin: Option<PathBuf>,
    /// Apparent size of rootfs.ext4 (sparse: only used blocks take disk space),
    /// in bytes or with a K, M, G or T suffix.
    #[arg(long, default_value = "2G", value_parser = parse_size)]
    size: u64,
    /// Debian mirror for debootstrap [default: the host apt configuration's].
    #[arg(long)]
    mirror: Option<String>,
    /// A package to install on top of the default list (repeatable).
    #[arg(long = "package", value_name = "NAME")]
    packages: Vec<String>,
}

#[derive(Debug, clap::Args)]
pub struct ShowArgs {
    /// Ember's data directory.
    #[arg(long, env = "EMBER_DATA_DIR", default_value = "/var/lib/ember")]
    data_dir: PathBuf,
}

pub async fn run(cmd: ImageCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        ImageCommand::Build(args) => build(args).await,
        ImageCommand::Import(args) => {
            let guest = args
                .guest_bin
                .unwrap_or_else(ember_image::default_guest_binary);
            let imported = if let Some(reference) = args.source.strip_prefix("docker://") {
                let options = ember_image::registry::RegistryOptions {
                    username: args.registry_user,
                    password: std::env::var("EMBER_REGISTRY_PASSWORD").ok(),
                    plain_http: args.plain_http,
                    ca_certificates: args.registry_ca,
                };
                let mut view = StepView::new();
                ember_image::registry::import(
                    &args.data_dir,
                    reference,
                    &options,
                    &guest,
                    &mut |p| view.show(p),
                )
                .await?
            } else {
                let source: ember_image::oci::Source = args
                    .source
                    .parse()
                    .map_err(|e: String| anyhow::anyhow!(e))?;
                tokio::task::spawn_blocking(move || {
                    let mut view = StepView::new();
                    ember_image::oci::import(&args.data_dir, &source, &guest, &mut |p| view.show(p))
                })
                .await
                .context("image import task")??
            };
            print_imported(&imported);
            Ok(ExitCode::SUCCESS)
        }
        ImageCommand::List(args) => {
            let images = ember_image::oci::list(&args.data_dir);
            if images.is_empty() {
                println!("no imported images: `ember image import oci:DIR` adds one");
            }
            for image in images {
                let m = &image.manifest;
                println!(
                    "{}  {}  {} layers  {} MiB  {}",
                    m.key,
                    &m.digest[..m.digest.len().min(19)],
                    m.layers,
                    m.tree_bytes >> 20,
                    m.source
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        ImageCommand::Show(args) => {
            let image = Image::locate(&args.data_dir).with_context(|| {
                format!(
                    "no image under {}: run `ember image build`",
                    args.data_dir.display()
                )
            })?;
            print_image(&image);
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn build(args: BuildArgs) -> anyhow::Result<ExitCode> {
    let mut spec = ImageSpec::new(
        args.guest_bin
            .unwrap_or_else(ember_image::default_guest_binary),
    );
    spec.disk_size = args.size;
    spec.mirror = args.mirror;
    spec.packages.extend(args.packages);
    let data_dir = args.data_dir;
    let image = tokio::task::spawn_blocking(move || {
        let mut view = StepView::new();
        Image::ensure(&data_dir, &spec, &mut |p| view.show(p))
    })
    .await
    .context("image build task")??;
    print_image(&image);
    Ok(ExitCode::SUCCESS)
}

fn print_imported(image: &ember_image::oci::ImportedImage) {
    let m = &image.manifest;
    println!("imported {} as image {}", m.source, m.key);
    println!("  digest   {}", m.digest);
    println!(
        "  rootfs   {}  ({})",
        image.rootfs.display(),
        sizes(&image.rootfs)
    );
    let d = &m.defaults;
    if !d.entrypoint.is_empty() || !d.cmd.is_empty() {
        println!("  command  {:?} {:?}", d.entrypoint, d.cmd);
    }
    if let Some(dir) = &d.working_dir {
        println!("  workdir  {dir}");
    }
    if let Some(user) = &d.user {
        println!("  user     {user}");
    }
    for pair in &d.env {
        println!("  env      {pair}");
    }
}

fn print_image(image: &Image) {
    let m = &image.manifest;
    println!(
        "image {} ({} {})",
        m.key, m.kernel.package, m.kernel.version
    );
    println!("  vmlinux  {}", image.vmlinux.display());
    println!("  initrd   {}", image.initrd.display());
    println!(
        "  rootfs   {}  ({})",
        image.rootfs.display(),
        sizes(&image.rootfs)
    );
    println!("  kernel args: {}", image.kernel_args());
}

/// "2048 MiB, 364 MiB on disk".
fn sizes(path: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata(path) {
        Ok(m) => format!(
            "{} MiB, {} MiB on disk",
            m.len() >> 20,
            (m.blocks() * 512) >> 20
        ),
        Err(e) => e.to_string(),
    }
}

/// One line per step on stderr: a spinner with the tool's latest output
/// while it runs (on a terminal), then the step's time.
pub(crate) struct StepView {
    tty: bool,
    spinner: Option<ProgressBar>,
}

impl StepView {
    pub(crate) fn new() -> Self {
        StepView {
            tty: std::io::stderr().is_terminal(),
            spinner: None,
        }
    }

    pub(crate) fn show(&mut self, progress: Progress) {
        match progress {
            Progress::WaitingForLock { lock } => {
                self.line(format!(
                    "waiting for another build to finish (lock {})",
                    lock.display()
                ));
            }
            Progress::Started(step) if self.tty => {
                let bar = ProgressBar::new_spinner();
                bar.set_style(
                    ProgressStyle::with_template("{spinner} {prefix:<26} {elapsed:>4} {wide_msg}")
                        .expect("static template"),
                );
                bar.set_prefix(step.label());
                bar.enable_steady_tick(Duration::from_millis(120));
                self.spinner = Some(bar);
            }
            Progress::Started(_) => {}
            Progress::Detail { step, line } => {
                tracing::debug!(step = %step, "{line}");
                if let Some(bar) = &self.spinner {
                    bar.set_message(line);
                }
            }
            Progress::Finished {
                step,
                elapsed,
                cached,
            } => {
                if let Some(bar) = self.spinner.take() {
                    bar.finish_and_clear();
                }
                let how = if cached { "  (cached)" } else { "" };
                self.line(format!(
                    "✓ {:<26} {:>6.1}s{how}",
                    step.label(),
                    elapsed.as_secs_f64()
                ));
            }
        }
    }

    fn line(&self, text: String) {
        match &self.spinner {
            Some(bar) => bar.println(text),
            None => eprintln!("{text}"),
        }
    }
}

/// Bytes, or a number with a binary K/M/G/T suffix (`2G`, `512MiB`).
fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size like 2G or 4096M"))?;
    let shift = match unit
        .trim()
        .to_ascii_uppercase()
        .trim_end_matches("IB")
        .trim_end_matches('B')
    {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(format!("{text:?}: unknown unit {unit:?}; use K, M, G or T")),
    };
    number
        .checked_mul(1 << shift)
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("{text:?} is not a usable size"))
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1t"), Ok(1 << 40));
        assert!(parse_size("2X").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("0").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
