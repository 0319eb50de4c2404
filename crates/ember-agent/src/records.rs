//! The agent's on-disk state: one JSON record per sandbox, the list of
//! template builds and the warm bases, under `<data>/sandboxes/`,
//! `<data>/templates/` and `<data>/warm/`.
//!
//! Every write goes to a temporary file that is fsynced and renamed over the
//! old one, so a crash leaves either the old or the new record, never half
//! of one. Paused sandboxes exist only here and in the build store, which is
//! why a host-agent crash cannot lose them.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use ember_types::{BuildId, SandboxId};
use serde::{Deserialize, Serialize};

use crate::error::AgentError;
use crate::state::SandboxRecord;

/// A template build kept alive by name (the control plane holds the name;
/// the agent holds the build).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateRecord {
    pub build: BuildId,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub source_sandbox: SandboxId,
    pub created_at: String,
}

/// A warm base: the base image booted once, snapshotted before any tenant
/// saw it (before its first `/init`), so a plain create of this shape
/// forks from it instead of booting. The agent's own, never listed as a
/// template: the control plane neither sees nor sweeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WarmRecord {
    pub build: BuildId,
    /// The image key it was booted from; a record of another image is
    /// stale and dropped.
    pub image: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub created_at: String,
}

impl WarmRecord {
    fn file_name(vcpus: u32, memory_mib: u32) -> String {
        format!("{vcpus}x{memory_mib}.json")
    }
}

#[derive(Debug, Clone)]
pub struct Records {
    sandboxes: PathBuf,
    templates: PathBuf,
    warm: PathBuf,
}

impl Records {
    pub fn open(data_dir: &Path) -> Result<Records, AgentError> {
        let records = Records {
            sandboxes: data_dir.join("sandboxes"),
            templates: data_dir.join("templates"),
            warm: data_dir.join("warm"),
        };
        for dir in [&records.sandboxes, &records.templates, &records.warm] {
            fs::create_dir_all(dir)
                .map_err(|e| AgentError::io(format!("create {}", dir.display()), e))?;
        }
        Ok(records)
    }

    /// The directory a sandbox's disk layer and other files live in.
    pub fn sandbox_dir(&self, id: &SandboxId) -> PathBuf {
        self.sandboxes.join(id.as_str())
    }

    pub fn save(&self, record: &SandboxRecord) -> Result<(), AgentError> {
        let dir = self.sandbox_dir(&record.id);
        fs::create_dir_all(&dir)
            .map_err(|e| AgentError::io(format!("create {}", dir.display()), e))?;
        write_json_atomic(&dir.join("state.json"), record)
    }

    /// Every sandbox record on disk. A record that cannot be parsed is
    /// reported, not skipped silently: it is returned as an error entry so
    /// the caller can log it and leave the files for an operator.
    pub fn load_all(&self) -> Result<Vec<Result<SandboxRecord, AgentError>>, AgentError> {
        let mut out = Vec::new();
        let entries = fs::read_dir(&self.sandboxes)
            .map_err(|e| AgentError::io(format!("read {}", self.sandboxes.display()), e))?;
        for entry in entries {
            let entry = entry.map_err(|e| AgentError::io("read sandboxes directory", e))?;
            let path = entry.path().join("state.json");
            if !path.exists() {
                continue;
            }
            out.push(read_json(&path));
        }
        Ok(out)
    }

    /// Forget a destroyed sandbox: its directory and everything left in it.
    pub fn remove(&self, id: &SandboxId) -> Result<(), AgentError> {
        let dir = self.sandbox_dir(id);
        match fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(AgentError::io(format!("remove {}", dir.display()), e)),
        }
    }

    pub fn save_template(&self, t: &TemplateRecord) -> Result<(), AgentError> {
        write_json_atomic(&self.templates.join(format!("{}.json", t.build)), t)
    }

    pub fn remove_template(&self, build: &BuildId) -> Result<bool, AgentError> {
        let path = self.templates.join(format!("{build}.json"));
        match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(AgentError::io(format!("remove {}", path.display()), e)),
        }
    }

    pub fn templates(&self) -> Result<Vec<TemplateRecord>, AgentError> {
        let mut out = Vec::new();
        let entries = fs::read_dir(&self.templates)
            .map_err(|e| AgentError::io(format!("read {}", self.templates.display()), e))?;
        for entry in entries {
            let path = entry
                .map_err(|e| AgentError::io("read templates directory", e))?
                .path();
            if path.extension().is_some_and(|e| e == "json") {
                out.push(read_json(&path)?);
            }
        }
        Ok(out)
    }
}

impl Records {
    /// Saving a warm base replaces the one of the same shape (gc frees the
    /// old build).
    pub fn save_warm(&self, w: &WarmRecord) -> Result<(), AgentError> {
        write_json_atomic(
            &self.warm.join(WarmRecord::file_name(w.vcpus, w.memory_mib)),
            w,
        )
    }

    /// The warm bases of `image`. Records of other images (the agent was
    /// given a new one) and unreadable ones are removed: a warm base is
    /// derived data, made again on the next create of its shape.
    pub fn warm(&self, image: &str) -> Vec<WarmRecord> {
        let Ok(entries) = fs::read_dir(&self.warm) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            match read_json::<WarmRecord>(&path) {
                Ok(w) if w.image == image => out.push(w),
                _ => {
                    let _ = fs::remove_file(&path);
                }
            }
        }
        out
    }
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, AgentError> {
    let bytes =
        fs::read(path).map_err(|e| AgentError::io(format!("read {}", path.display()), e))?;
    serde_json::from_slice(&bytes).map_err(|e| AgentError::CorruptRecord {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })
}

/// Write `value` as JSON to `path` so that a crash leaves the old file or the
/// new one, never a torn one.
pub(crate) fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> Result<(), AgentError> {
    let dir = path.parent().expect("records live in a directory");
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("record")
    ));
    let body = serde_json::to_vec_pretty(value).expect("records serialize");
    let ctx = |what: &str| format!("{what} {}", tmp.display());
    let mut f = fs::File::create(&tmp).map_err(|e| AgentError::io(ctx("create"), e))?;
    f.write_all(&body)
        .map_err(|e| AgentError::io(ctx("write"), e))?;
    f.sync_all().map_err(|e| AgentError::io(ctx("fsync"), e))?;
    fs::rename(&tmp, path)
        .map_err(|e| AgentError::io(format!("rename over {}", path.display()), e))?;
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| AgentError::io(format!("fsync {}", dir.display()), e))?;
    Ok(())
}
