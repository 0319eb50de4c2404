//! Importing a container image — an OCI image layout directory or a
//! `docker save` archive — as an Ember root filesystem: every blob checked
//! against its digest, the layers applied in order (see [`crate::layer`]),
//! `ember-guest` added at [`GUEST_INIT`] without touching the image's own
//! files, and the tree packed into a sparse ext4 image with headroom.
//!
//! The result lives under `<data>/images/oci/<key>`, keyed by the image's
//! manifest digest and the guest binary, so importing the same image twice
//! is free. The image's `Env`, `WorkingDir`, `User`, `Entrypoint` and `Cmd`
//! are kept as [`ImageDefaults`].

use std::collections::HashMap;
use std::fmt;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::layer::Tree;
use crate::progress::{Progress, Step, StepTimer};
use crate::store::{self, Store, write_durable};
use crate::{DEFAULT_DISK_SIZE, Error, Result, elf, rootfs};

/// Where `ember-guest` goes in an imported image; boot it with
/// `init=` this path. Images do not use the name, and nothing of theirs is
/// moved or replaced.
pub const GUEST_INIT: &str = "/.ember/init";

/// Bump when an import's output changes for the same image.
const FORMAT_VERSION: u32 = 2;
const MANIFEST: &str = "image.json";
/// Index, manifest and config documents are small; a bigger one is not an image.
const MAX_DOCUMENT: u64 = 4 << 20;

const REF_NAME: &str = "org.opencontainers.image.ref.name";
const CONTAINERD_NAME: &str = "io.containerd.image.name";

/// Where an image comes from, in skopeo's transport syntax.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// `oci:DIR[:REF]`: an OCI image layout; `REF` picks one of several
    /// images by its `org.opencontainers.image.ref.name`.
    Layout {
        dir: PathBuf,
        reference: Option<String>,
    },
    /// `docker-archive:FILE[:REF]`: what `docker save` writes (either its
    /// classic `manifest.json` or the OCI layout newer Dockers put inside);
    /// `REF` picks an image by one of its tags.
    DockerArchive {
        path: PathBuf,
        reference: Option<String>,
    },
}

impl FromStr for Source {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        // A path may hold `:` and a reference does (`app:latest`): split at
        // the first `:` where what comes before exists, else keep it whole.
        let split = |rest: &str| -> (PathBuf, Option<String>) {
            if Path::new(rest).exists() {
                return (PathBuf::from(rest), None);
            }
            for (at, _) in rest.match_indices(':') {
                let (path, reference) = (&rest[..at], &rest[at + 1..]);
                if !reference.is_empty() && Path::new(path).exists() {
                    return (PathBuf::from(path), Some(reference.to_owned()));
                }
            }
            (PathBuf::from(rest), None)
        };
        if let Some(rest) = s.strip_prefix("oci:") {
            let (dir, reference) = split(rest);
            Ok(Source::Layout { dir, reference })
        } else if let Some(rest) = s.strip_prefix("docker-archive:") {
            let (path, reference) = split(rest);
            Ok(Source::DockerArchive { path, reference })
        } else {
            Err(format!(
                "`{s}` names no image source: write docker://HOST/REPOSITORY[:TAG] for a registry, \
                 oci:DIR[:REF] for an OCI image layout or docker-archive:FILE[:REF] for a `docker save` archive"
            ))
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (scheme, path, reference) = match self {
            Source::Layout { dir, reference } => ("oci", dir, reference),
            Source::DockerArchive { path, reference } => ("docker-archive", path, reference),
        };
        write!(f, "{scheme}:{}", path.display())?;
        if let Some(r) = reference {
            write!(f, ":{r}")?;
        }
        Ok(())
    }
}

/// What the image asks of a process started in it, from its config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageDefaults {
    /// `NAME=value`, in the image's order.
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
}

/// The record kept next to an imported root filesystem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportManifest {
    pub format: u32,
    pub key: String,
    /// `sha256:…` of the image manifest (for a classic `docker save`
    /// archive, of the image config: it has no manifest blob).
    pub digest: String,
    /// The source it was first imported from, as given.
    pub source: String,
    pub architecture: String,
    pub defaults: ImageDefaults,
    pub layers: usize,
    /// Bytes the unpacked tree takes.
    pub tree_bytes: u64,
    pub disk_size: u64,
    pub guest_sha256: String,
    pub created_unix: u64,
}

/// An imported image: a read-only ext4 root filesystem and its record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportedImage {
    pub dir: PathBuf,
    pub rootfs: PathBuf,
    pub manifest: ImportManifest,
}

impl ImportedImage {
    pub fn open(dir: &Path) -> Result<ImportedImage> {
        let path = dir.join(MANIFEST);
        let text = fs::read_to_string(&path).map_err(Error::io("read", &path))?;
        let manifest: ImportManifest =
            serde_json::from_str(&text).map_err(|e| Error::Manifest {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        let rootfs = dir.join("rootfs.ext4");
        if !rootfs.is_file() {
            return Err(Error::Manifest {
                path,
                reason: "rootfs.ext4 is missing next to it".into(),
            });
        }
        Ok(ImportedImage {
            dir: dir.to_owned(),
            rootfs,
            manifest,
        })
    }

    /// The kernel command line's addition that boots Ember's init.
    pub fn kernel_args(&self) -> String {
        format!("init={GUEST_INIT}")
    }
}

/// Every imported image under `data_dir`.
pub fn list(data_dir: &Path) -> Vec<ImportedImage> {
    let Ok(entries) = fs::read_dir(data_dir.join("images").join("oci")) else {
        return Vec::new();
    };
    let mut out: Vec<_> = entries
        .flatten()
        .filter_map(|e| ImportedImage::open(&e.path()).ok())
        .collect();
    out.sort_by_key(|i| std::cmp::Reverse(i.manifest.created_unix));
    out
}

/// The imported image whose digest or key starts with `prefix` (at least 8
/// characters, after an optional `sha256:`).
pub fn find(data_dir: &Path, prefix: &str) -> Option<ImportedImage> {
    let bare = prefix.strip_prefix("sha256:").unwrap_or(prefix);
    if bare.len() < 8 {
        return None;
    }
    let mut found = list(data_dir).into_iter().filter(|i| {
        i.manifest.key.starts_with(bare)
            || i.manifest
                .digest
                .strip_prefix("sha256:")
                .is_some_and(|d| d.starts_with(bare))
    });
    let first = found.next()?;
    found.next().is_none().then_some(first)
}

fn import_error(source: &Source, reason: impl Into<String>) -> Error {
    Error::ImageImport {
        image: source.to_string(),
        reason: reason.into(),
    }
}

/// A `sha256:` digest, checked to be one (so it is safe in a path).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Digest(String);

impl Digest {
    fn parse(s: &str) -> std::result::Result<Digest, String> {
        let hex = s.strip_prefix("sha256:").ok_or_else(|| {
            format!("digest `{s}` is not sha256 (the only algorithm Ember verifies)")
        })?;
        if hex.len() != 64
            || !hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(format!("`{s}` is not a sha256 digest"));
        }
        Ok(Digest(hex.to_owned()))
    }
    fn blob_path(&self) -> String {
        format!("blobs/sha256/{}", self.0)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.0)
    }
}

/// The files of an image source: a directory, or the members of a tar.
enum Files {
    Dir(PathBuf),
    Tar {
        path: PathBuf,
        /// Member name → (data offset, size) or a link to another member.
        members: HashMap<String, Member>,
    },
}

enum Member {
    Data { offset: u64, size: u64 },
    Link(String),
}

fn member_name(raw: &Path) -> Option<String> {
    let mut parts = Vec::new();
    for c in raw.components() {
        match c {
            std::path::Component::Normal(n) => parts.push(n.to_str()?.to_owned()),
            std::path::Component::CurDir => {}
            _ => return None,
        }
    }
    Some(parts.join("/"))
}

impl Files {
    fn tar(path: &Path) -> io::Result<Files> {
        let mut archive = tar::Archive::new(File::open(path)?);
        let mut members = HashMap::new();
        for entry in archive.entries()? {
            let entry = entry?;
            let raw = entry.path()?.into_owned();
            let Some(name) = member_name(&raw) else {
                continue; // `..` or absolute: not a name Ember will look up
            };
            match entry.header().entry_type() {
                t if t.is_file() => {
                    members.insert(
                        name,
                        Member::Data {
                            offset: entry.raw_file_position(),
                            size: entry.size(),
                        },
                    );
                }
                tar::EntryType::Symlink | tar::EntryType::Link => {
                    let Some(target) = entry.link_name()? else {
                        continue;
                    };
                    let target = if entry.header().entry_type() == tar::EntryType::Symlink {
                        // Relative to the link's directory, as docker writes them.
                        let base = Path::new(&name).parent().unwrap_or(Path::new(""));
                        crate::layer::lexical(base, &target)
                    } else {
                        target.into_owned()
                    };
                    if let Some(target) = member_name(&target) {
                        members.insert(name, Member::Link(target));
                    }
                }
                _ => {}
            }
        }
        Ok(Files::Tar {
            path: path.to_owned(),
            members,
        })
    }

    fn exists(&self, name: &str) -> bool {
        match self {
            Files::Dir(dir) => dir.join(name).is_file(),
            Files::Tar { members, .. } => members.contains_key(name),
        }
    }

    /// Open a file by its name inside the source (names come from the
    /// image's own documents; in a directory only digests and fixed names
    /// are ever looked up).
    fn open(&self, name: &str) -> io::Result<(Box<dyn Read + Send>, u64)> {
        match self {
            Files::Dir(dir) => {
                let file = File::open(dir.join(name))?;
                let size = file.metadata()?.len();
                Ok((Box::new(file), size))
            }
            Files::Tar { path, members } => {
                let mut name = name.to_owned();
                for _ in 0..8 {
                    match members.get(&name) {
                        Some(Member::Data { offset, size }) => {
                            let mut file = File::open(path)?;
                            file.seek(SeekFrom::Start(*offset))?;
                            return Ok((Box::new(file.take(*size)), *size));
                        }
                        Some(Member::Link(target)) => name = target.clone(),
                        None => break,
                    }
                }
                Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("the archive has no file `{name}`"),
                ))
            }
        }
    }
}

/// A reader that hashes and counts what passes through it.
struct Hashing<R> {
    inner: R,
    state: Arc<Mutex<(Sha256, u64)>>,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let mut state = self.state.lock().expect("hash state");
        state.0.update(&buf[..n]);
        state.1 += n as u64;
        Ok(n)
    }
}

fn hashing<R: Read>(inner: R) -> (Hashing<R>, Arc<Mutex<(Sha256, u64)>>) {
    let state = Arc::new(Mutex::new((Sha256::new(), 0)));
    (
        Hashing {
            inner,
            state: state.clone(),
        },
        state,
    )
}

fn finish(state: &Arc<Mutex<(Sha256, u64)>>) -> (String, u64) {
    let state = state.lock().expect("hash state");
    (store::hex(&state.0.clone().finalize()), state.1)
}

#[derive(Debug, Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    size: u64,
    #[serde(default)]
    annotations: HashMap<String, String>,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Debug, Deserialize)]
struct Platform {
    os: String,
    architecture: String,
}

#[derive(Debug, Deserialize)]
struct Index {
    manifests: Vec<Descriptor>,
}

#[derive(Debug, Deserialize)]
struct ImageManifestDoc {
    config: Descriptor,
    layers: Vec<Descriptor>,
}

#[derive(Debug, Deserialize)]
struct DockerEntry {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct ConfigDoc {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
    #[serde(default)]
    config: Option<RunConfig>,
    #[serde(default)]
    rootfs: Option<RootfsDoc>,
}

#[derive(Debug, Deserialize, Default)]
struct RunConfig {
    #[serde(rename = "Env", default)]
    env: Option<Vec<String>>,
    #[serde(rename = "WorkingDir", default)]
    working_dir: Option<String>,
    #[serde(rename = "User", default)]
    user: Option<String>,
    #[serde(rename = "Entrypoint", default)]
    entrypoint: Option<Vec<String>>,
    #[serde(rename = "Cmd", default)]
    cmd: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
struct RootfsDoc {
    #[serde(default)]
    diff_ids: Vec<String>,
}

/// A layer to apply and how to check it.
struct LayerPlan {
    name: String,
    /// The digest of the bytes as stored (OCI descriptors).
    stored: Option<(Digest, u64)>,
    /// The digest of the uncompressed tar (the config's `diff_ids`).
    diff_id: Option<Digest>,
}

/// An image resolved to its config and layers, all verified but the layers
/// (checked as they stream through).
struct Resolved {
    digest: Digest,
    config: ConfigDoc,
    layers: Vec<LayerPlan>,
}

/// The architecture name images use for this host's.
pub fn host_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

fn read_limited(source: &Source, files: &Files, name: &str, what: &str) -> Result<Vec<u8>> {
    let (reader, size) = files
        .open(name)
        .map_err(|e| import_error(source, format!("{what} `{name}`: {e}")))?;
    if size > MAX_DOCUMENT {
        return Err(import_error(
            source,
            format!("{what} `{name}` is {size} bytes; an image document is at most {MAX_DOCUMENT}"),
        ));
    }
    let mut bytes = Vec::new();
    reader
        .take(MAX_DOCUMENT)
        .read_to_end(&mut bytes)
        .map_err(|e| import_error(source, format!("{what} `{name}`: {e}")))?;
    Ok(bytes)
}

/// A blob by digest, its bytes checked against it.
fn read_blob(source: &Source, files: &Files, digest: &Digest, what: &str) -> Result<Vec<u8>> {
    let bytes = read_limited(source, files, &digest.blob_path(), what)?;
    let actual = store::hex(&Sha256::digest(&bytes));
    if actual != digest.0 {
        return Err(import_error(
            source,
            format!(
                "{what} {digest} does not match its digest (its content hashes to sha256:{actual}): \
                 the image is corrupt or was tampered with"
            ),
        ));
    }
    Ok(bytes)
}

fn parse_json<T: serde::de::DeserializeOwned>(
    source: &Source,
    bytes: &[u8],
    what: &str,
) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| import_error(source, format!("{what}: {e}")))
}

fn digest(source: &Source, s: &str) -> Result<Digest> {
    Digest::parse(s).map_err(|e| import_error(source, e))
}

const INDEX_TYPES: [&str; 2] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

/// Follow an OCI layout's `index.json` to one image for this host.
fn resolve_layout(source: &Source, files: &Files, reference: Option<&str>) -> Result<Resolved> {
    if !files.exists("oci-layout") {
        return Err(import_error(
            source,
            "not an OCI image layout: there is no `oci-layout` file (for a `docker save` archive write docker-archive:FILE)",
        ));
    }
    let index: Index = parse_json(
        source,
        &read_limited(source, files, "index.json", "index")?,
        "index.json",
    )?;
    let names = |d: &Descriptor| -> Vec<String> {
        [REF_NAME, CONTAINERD_NAME]
            .iter()
            .filter_map(|k| d.annotations.get(*k).cloned())
            .collect()
    };
    let chosen: Vec<&Descriptor> = match reference {
        Some(r) => index
            .manifests
            .iter()
            .filter(|d| {
                names(d)
                    .iter()
                    .any(|n| n == r || n.ends_with(&format!(":{r}")))
            })
            .collect(),
        None => index.manifests.iter().collect(),
    };
    let descriptor = match chosen.as_slice() {
        [one] => *one,
        [] => {
            let known: Vec<String> = index.manifests.iter().flat_map(names).collect();
            return Err(import_error(
                source,
                match reference {
                    Some(r) => format!(
                        "no image is named `{r}` here; it holds: {}",
                        if known.is_empty() {
                            "unnamed images only".into()
                        } else {
                            known.join(", ")
                        }
                    ),
                    None => "index.json lists no image".into(),
                },
            ));
        }
        many => {
            let known: Vec<String> = many.iter().flat_map(|d| names(d)).collect();
            return Err(import_error(
                source,
                format!(
                    "it holds {} images; name one after a colon (oci:DIR:REF), one of: {}",
                    many.len(),
                    known.join(", ")
                ),
            ));
        }
    };
    let mut descriptor_digest = digest(source, &descriptor.digest)?;
    let mut bytes = read_blob(source, files, &descriptor_digest, "manifest")?;
    if INDEX_TYPES.contains(&descriptor.media_type.as_str()) || is_index(&bytes) {
        let inner: Index = parse_json(source, &bytes, "image index")?;
        let arch = host_architecture();
        let pick = inner.manifests.iter().find(|d| {
            d.platform
                .as_ref()
                .is_some_and(|p| p.os == "linux" && p.architecture == arch)
        });
        let Some(pick) = pick else {
            let platforms: Vec<String> = inner
                .manifests
                .iter()
                .filter_map(|d| d.platform.as_ref())
                .map(|p| format!("{}/{}", p.os, p.architecture))
                .collect();
            return Err(import_error(
                source,
                format!(
                    "the image has no linux/{arch} variant (it has {}); Ember runs linux/{arch} guests on this host",
                    platforms.join(", ")
                ),
            ));
        };
        descriptor_digest = digest(source, &pick.digest)?;
        bytes = read_blob(source, files, &descriptor_digest, "manifest")?;
    }
    let manifest: ImageManifestDoc = parse_json(source, &bytes, "image manifest")?;
    let config_digest = digest(source, &manifest.config.digest)?;
    let config: ConfigDoc = parse_json(
        source,
        &read_blob(source, files, &config_digest, "image config")?,
        "image config",
    )?;
    let diff_ids = config
        .rootfs
        .as_ref()
        .map(|r| r.diff_ids.clone())
        .unwrap_or_default();
    let mut layers = Vec::new();
    for (i, layer) in manifest.layers.iter().enumerate() {
        let d = digest(source, &layer.digest)?;
        layers.push(LayerPlan {
            name: d.blob_path(),
            stored: Some((d, layer.size)),
            diff_id: diff_ids.get(i).map(|s| digest(source, s)).transpose()?,
        });
    }
    Ok(Resolved {
        digest: descriptor_digest,
        config,
        layers,
    })
}

fn is_index(bytes: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(bytes)
        .ok()
        .is_some_and(|v| v.get("manifests").is_some() && v.get("layers").is_none())
}

/// A classic `docker save` archive: `manifest.json`, configs named by their
/// digest, layers checked against the config's `diff_ids`.
fn resolve_docker(source: &Source, files: &Files, reference: Option<&str>) -> Result<Resolved> {
    let entries: Vec<DockerEntry> = parse_json(
        source,
        &read_limited(source, files, "manifest.json", "manifest")?,
        "manifest.json",
    )?;
    let tags = |e: &DockerEntry| e.repo_tags.clone().unwrap_or_default();
    let chosen: Vec<&DockerEntry> = match reference {
        Some(r) => entries
            .iter()
            .filter(|e| {
                tags(e)
                    .iter()
                    .any(|t| t == r || t.ends_with(&format!(":{r}")))
            })
            .collect(),
        None => entries.iter().collect(),
    };
    let entry = match chosen.as_slice() {
        [one] => *one,
        [] => {
            return Err(import_error(
                source,
                format!(
                    "no image tagged `{}` here; it holds: {}",
                    reference.unwrap_or_default(),
                    entries.iter().flat_map(tags).collect::<Vec<_>>().join(", ")
                ),
            ));
        }
        many => {
            return Err(import_error(
                source,
                format!(
                    "it holds {} images; name one after a colon (docker-archive:FILE:TAG), one of: {}",
                    many.len(),
                    many.iter()
                        .flat_map(|e| tags(e))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
    };
    let bytes = read_limited(source, files, &entry.config, "image config")?;
    let actual = store::hex(&Sha256::digest(&bytes));
    // The config is named by its digest (`<hex>.json` or `blobs/sha256/<hex>`).
    let named = Path::new(&entry.config)
        .file_name()
        .and_then(|n| n.to_str())
        .map(|n| n.trim_end_matches(".json").to_owned())
        .filter(|n| Digest::parse(&format!("sha256:{n}")).is_ok());
    if let Some(named) = named
        && named != actual
    {
        return Err(import_error(
            source,
            format!(
                "image config `{}` does not match its digest (it hashes to sha256:{actual}): the archive is corrupt or was tampered with",
                entry.config
            ),
        ));
    }
    let config: ConfigDoc = parse_json(source, &bytes, "image config")?;
    let diff_ids = config
        .rootfs
        .as_ref()
        .map(|r| r.diff_ids.clone())
        .unwrap_or_default();
    if diff_ids.len() != entry.layers.len() {
        return Err(import_error(
            source,
            format!(
                "manifest.json lists {} layers but the config's rootfs.diff_ids {}: the archive is inconsistent",
                entry.layers.len(),
                diff_ids.len()
            ),
        ));
    }
    let mut layers = Vec::new();
    for (name, diff_id) in entry.layers.iter().zip(&diff_ids) {
        layers.push(LayerPlan {
            name: name.clone(),
            stored: None,
            diff_id: Some(digest(source, diff_id)?),
        });
    }
    Ok(Resolved {
        digest: Digest(actual),
        config,
        layers,
    })
}

fn resolve(source: &Source) -> Result<(Files, Resolved)> {
    match source {
        Source::Layout { dir, reference } => {
            if !dir.is_dir() {
                return Err(import_error(source, "no such directory"));
            }
            let files = Files::Dir(dir.clone());
            let resolved = resolve_layout(source, &files, reference.as_deref())?;
            Ok((files, resolved))
        }
        Source::DockerArchive { path, reference } => {
            let files = Files::tar(path).map_err(|e| {
                import_error(source, format!("cannot read it as a tar archive: {e}"))
            })?;
            // Newer Dockers put an OCI layout in the archive, with digests
            // for everything; prefer it.
            let resolved = if files.exists("oci-layout") && files.exists("index.json") {
                resolve_layout(source, &files, reference.as_deref())?
            } else if files.exists("manifest.json") {
                resolve_docker(source, &files, reference.as_deref())?
            } else {
                return Err(import_error(
                    source,
                    "neither manifest.json nor an OCI layout is in it: is it a `docker save` archive?",
                ));
            };
            Ok((files, resolved))
        }
    }
}

/// Apply one layer from `files`, checking its digests as it streams.
fn apply_layer(
    source: &Source,
    files: &Files,
    tree: &Tree,
    n: usize,
    plan: &LayerPlan,
) -> Result<crate::layer::LayerStats> {
    let label = format!("layer {n} ({})", plan.name);
    let (reader, size) = files
        .open(&plan.name)
        .map_err(|e| import_error(source, format!("{label}: {e}")))?;
    if let Some((_, want)) = &plan.stored
        && *want != 0
        && *want != size
    {
        return Err(import_error(
            source,
            format!("{label} is {size} bytes but its descriptor says {want}: the image is corrupt"),
        ));
    }
    let (stored, stored_hash) = hashing(reader);
    let mut stored = BufReader::with_capacity(1 << 20, stored);
    let magic = stored
        .fill_buf()
        .map_err(|e| import_error(source, format!("{label}: {e}")))?
        .get(..4)
        .map(<[u8]>::to_vec)
        .unwrap_or_default();
    let unpacked: Box<dyn Read> = if magic.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::read::MultiGzDecoder::new(stored))
    } else if magic == [0x28, 0xb5, 0x2f, 0xfd] {
        // One zstd frame per layer, as image builders write them; a stream
        // of several stops after the first, and the digest of the stored
        // bytes then fails the import rather than dropping files quietly.
        let decoder = ruzstd::decoding::StreamingDecoder::new(stored)
            .map_err(|e| import_error(source, format!("{label}: not a zstd stream: {e}")))?;
        Box::new(decoder)
    } else {
        Box::new(stored)
    };
    let (mut unpacked, unpacked_hash) = hashing(unpacked);
    let stats = tree
        .apply(&mut unpacked)
        .map_err(|e| import_error(source, format!("{label}: {e}")))?;
    // The tar's end-of-archive blocks (and any padding) count too.
    io::copy(&mut unpacked, &mut io::sink())
        .map_err(|e| import_error(source, format!("{label}: {e}")))?;
    drop(unpacked);
    if let Some((want, _)) = &plan.stored {
        let (got, _) = finish(&stored_hash);
        if got != want.0 {
            return Err(import_error(
                source,
                format!(
                    "{label} does not match its digest {want} (it hashes to sha256:{got}): the image is corrupt or was tampered with"
                ),
            ));
        }
    }
    if let Some(want) = &plan.diff_id {
        let (got, _) = finish(&unpacked_hash);
        // OCI images may legitimately be checked by the stored digest alone.
        if got != want.0 && plan.stored.is_none() {
            return Err(import_error(
                source,
                format!(
                    "{label} does not match its diff_id {want} (its content hashes to sha256:{got}): the archive is corrupt or was tampered with"
                ),
            ));
        }
    }
    Ok(stats)
}

fn tree_bytes(root: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
            let Ok(meta) = entry.path().symlink_metadata() else {
                continue;
            };
            total += meta.blocks() * 512;
            if meta.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    total
}

/// The disk an image gets: twice its tree plus 512 MiB for what users
/// install, and never less than the base image's.
fn disk_size_for(tree: u64) -> u64 {
    let want = tree.saturating_mul(2) + (512 << 20);
    want.max(DEFAULT_DISK_SIZE).div_ceil(1 << 20) << 20
}

/// Import `source` (or find it already imported) under `data_dir`, with
/// `guest` (a static `ember-guest`) as its init. Needs root to keep the
/// image's file ownership and device nodes.
pub fn import(
    data_dir: &Path,
    source: &Source,
    guest: &Path,
    progress: &mut dyn FnMut(Progress),
) -> Result<ImportedImage> {
    import_labelled(data_dir, source, &source.to_string(), guest, progress)
}

/// [`import`], recording `label` as where the image came from (a registry
/// reference for a layout pulled from one).
pub(crate) fn import_labelled(
    data_dir: &Path,
    source: &Source,
    label: &str,
    guest: &Path,
    progress: &mut dyn FnMut(Progress),
) -> Result<ImportedImage> {
    let guest_bytes = fs::read(guest).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => Error::GuestBinaryMissing {
            path: guest.to_owned(),
        },
        _ => Error::io("read", guest)(e),
    })?;
    if !elf::is_static(&guest_bytes).unwrap_or(false) {
        return Err(Error::GuestNotStatic {
            path: guest.to_owned(),
        });
    }
    if !nix::unistd::geteuid().is_root() {
        return Err(Error::NotRoot);
    }
    let guest_sha256 = store::hex(&Sha256::digest(&guest_bytes));

    let mut timer = StepTimer::start(Step::ImageManifest, progress);
    let (files, resolved) = resolve(source)?;
    let arch = host_architecture();
    if resolved.config.os != "linux" || resolved.config.architecture != arch {
        return Err(import_error(
            source,
            format!(
                "the image is for {}/{}; Ember runs linux/{arch} guests on this host: import its linux/{arch} variant",
                resolved.config.os, resolved.config.architecture
            ),
        ));
    }
    timer.detail(format!(
        "{} · {} layers",
        resolved.digest,
        resolved.layers.len()
    ));
    timer.finish(false);

    let store = Store::open(data_dir)?;
    let key = store::key(&[
        ("format", &FORMAT_VERSION.to_string()),
        ("image", &resolved.digest.to_string()),
        ("guest", &guest_sha256),
    ]);
    let parent = store.root().join("oci");
    fs::create_dir_all(&parent).map_err(Error::io("create", &parent))?;
    let dest = parent.join(&key);
    if let Ok(done) = ImportedImage::open(&dest) {
        progress(Progress::Finished {
            step: Step::Layers,
            elapsed: std::time::Duration::ZERO,
            cached: true,
        });
        return Ok(done);
    }
    let lock = store.lock(progress)?;
    if let Ok(done) = ImportedImage::open(&dest) {
        return Ok(done);
    }
    store.clear_stale(&lock)?;
    let staging = store.staging(&lock, "oci")?;
    let entry = staging.path().join("entry");
    let root = staging.path().join("root");
    // The unpacked tree holds the image's setuid files and device nodes
    // as real host files until it is packed: no one else may reach them.
    fs::set_permissions(
        staging.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .map_err(Error::io("chmod", staging.path()))?;
    for dir in [&entry, &root] {
        fs::create_dir(dir).map_err(Error::io("create", dir))?;
    }
    fs::set_permissions(&root, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .map_err(Error::io("chmod", &root))?;

    let mut timer = StepTimer::start(Step::Layers, progress);
    let tree = Tree::open(&root).map_err(Error::io("open", &root))?;
    for (i, plan) in resolved.layers.iter().enumerate() {
        let stats = apply_layer(source, &files, &tree, i + 1, plan)?;
        timer.detail(format!(
            "layer {}/{}: {} entries, {} MiB, {} whiteouts, {} hard links",
            i + 1,
            resolved.layers.len(),
            stats.entries,
            stats.bytes >> 20,
            stats.whiteouts,
            stats.hard_links
        ));
    }
    // A container runtime makes the WorkingDir at start when the image
    // lacks it; execs run there by default, so the disk gets it now,
    // through the tree like every other path the image names.
    let working_dir = resolved
        .config
        .config
        .as_ref()
        .and_then(|c| c.working_dir.as_deref())
        .filter(|w| !w.is_empty() && *w != "/");
    if let Some(wd) = working_dir {
        tree.ensure_dir(wd).map_err(Error::io(
            "create the image's WorkingDir",
            root.join(wd.trim_start_matches('/')),
        ))?;
    }
    // Through the tree, never by path: the image may have put a symlink
    // to anywhere at `/.ember`.
    tree.install(".ember", "init", &guest_bytes, 0o755)
        .map_err(Error::io(
            "install ember-guest into",
            root.join(".ember/init"),
        ))?;
    timer.finish(false);

    let mut timer = StepTimer::start(Step::Pack, progress);
    let tree_bytes = tree_bytes(&root);
    let disk_size = disk_size_for(tree_bytes);
    timer.detail(format!(
        "{} MiB of files into a {} MiB disk",
        tree_bytes >> 20,
        disk_size >> 20
    ));
    rootfs::make_ext4(&root, &entry.join("rootfs.ext4"), disk_size, &mut timer)?;
    let run = resolved.config.config.unwrap_or_default();
    let manifest = ImportManifest {
        format: FORMAT_VERSION,
        key: key.clone(),
        digest: resolved.digest.to_string(),
        source: label.to_owned(),
        architecture: resolved.config.architecture.clone(),
        defaults: ImageDefaults {
            env: run.env.unwrap_or_default(),
            working_dir: run.working_dir.filter(|w| !w.is_empty()),
            user: run.user.filter(|u| !u.is_empty()),
            entrypoint: run.entrypoint.unwrap_or_default(),
            cmd: run.cmd.unwrap_or_default(),
        },
        layers: resolved.layers.len(),
        tree_bytes,
        disk_size,
        guest_sha256,
        created_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default(),
    };
    let json = serde_json::to_vec_pretty(&manifest).expect("manifest serialises");
    write_durable(&entry.join(MANIFEST), &json)?;
    // The unpacked tree is not kept: the ext4 image holds it.
    drop(tree);
    store::remove_tree(&root)?;
    staging.publish("entry", &dest)?;
    timer.finish(false);
    ImportedImage::open(&dest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_parse_in_skopeo_syntax() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("img");
        fs::create_dir(&img).unwrap();
        let archive = dir.path().join("a.tar");
        fs::write(&archive, b"").unwrap();
        let (img_s, archive_s) = (img.to_str().unwrap(), archive.to_str().unwrap());
        assert_eq!(
            format!("oci:{img_s}").parse::<Source>().unwrap(),
            Source::Layout {
                dir: img.clone(),
                reference: None
            }
        );
        assert_eq!(
            format!("oci:{img_s}:v1").parse::<Source>().unwrap(),
            Source::Layout {
                dir: img.clone(),
                reference: Some("v1".into())
            }
        );
        assert_eq!(
            format!("docker-archive:{archive_s}:app:latest")
                .parse::<Source>()
                .unwrap(),
            Source::DockerArchive {
                path: archive.clone(),
                reference: Some("app:latest".into())
            }
        );
        let err = "/tmp/img".parse::<Source>().unwrap_err();
        assert!(err.contains("oci:DIR"), "{err}");
        assert_eq!(
            format!("docker-archive:{archive_s}")
                .parse::<Source>()
                .unwrap()
                .to_string(),
            format!("docker-archive:{archive_s}")
        );
    }

    #[test]
    fn digests_are_checked_before_they_become_paths() {
        assert!(Digest::parse(&format!("sha256:{}", "a".repeat(64))).is_ok());
        assert!(Digest::parse("sha256:../../etc/passwd").is_err());
        assert!(Digest::parse(&format!("sha512:{}", "a".repeat(128))).is_err());
        assert!(Digest::parse(&format!("sha256:{}", "A".repeat(64))).is_err());
    }

    #[test]
    fn disks_have_headroom() {
        assert_eq!(disk_size_for(0), DEFAULT_DISK_SIZE);
        assert_eq!(disk_size_for(3 << 30), (6 << 30) + (512 << 20));
    }
}
