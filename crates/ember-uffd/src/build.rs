//! A build from `ember-snapshot`'s store, ready to serve: its memory header
//! turned into a [`Layout`] over the data files of every build the header
//! references, and where the build's working-set sidecar lives.
//!
//! It does not write builds or check their checksums (that is
//! `BuildStore::verify`, too slow for a lazy restore); it checks what a
//! restore needs: the header decodes, every referenced build is present,
//! and every data file is long enough for the blocks the header puts there.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use ember_snapshot::{BuildStore, ImageKind};
use ember_types::BuildId;

use crate::Error;
use crate::source::{Backing, Image, Layout, Mapping};

/// The working-set sidecar's name in a build directory: the one file that
/// may appear in a committed build after the fact.
pub const WORKING_SET_FILE: &str = "working-set";

/// Open `build`'s guest memory image for serving.
pub fn open(store: &BuildStore, build: BuildId) -> Result<Image, Error> {
    let header = store
        .open_header(build, ImageKind::Memory)
        .map_err(|source| Error::Build { build, source })?;
    let mut files: BTreeMap<BuildId, usize> = BTreeMap::new();
    for b in header.referenced_builds() {
        let next = files.len();
        files.insert(b, next);
    }
    let paths: Vec<PathBuf> = files
        .keys()
        .map(|b| store.data_path(*b, ImageKind::Memory))
        .collect();
    let mappings = header
        .mappings()
        .iter()
        .map(|m| Mapping {
            offset: m.offset,
            length: m.length,
            backing: if m.is_nil() {
                Backing::Zero
            } else {
                Backing::File {
                    file: files[&m.build_id],
                    file_offset: m.build_storage_offset,
                }
            },
        })
        .collect();
    let layout = Layout::new(header.size(), mappings, paths.len())?;
    Image::open(build.to_string(), Arc::new(layout), &paths)
}

/// `<data>/builds/<build>/working-set`.
pub fn working_set_path(store: &BuildStore, build: BuildId) -> PathBuf {
    store.build_dir(build).join(WORKING_SET_FILE)
}
