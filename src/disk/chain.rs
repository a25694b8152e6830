//! Walking, opening and flattening backing chains.

use super::image::{probe, ImageFormat};
use super::{DiskError, IoContext, Result, MAX_CHAIN_DEPTH};
use crate::fsutil::{self, file_id, parent_dir, same_file};
use imago::file::File;
use imago::qcow2::Qcow2;
use imago::raw::Raw;
use imago::{
    DenyImplicitOpenGate, FormatAccess, FormatCreateBuilder, FormatDriverBuilder, Mapping, Storage,
    StorageCreateOptions, StorageOpenOptions,
};
use std::collections::HashSet;
use std::fs;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// One opened image layer (with its backing layers inside it, if any).
pub(crate) type Layer = FormatAccess<File>;

/// Largest read issued while copying: big enough to amortise per-request overhead, small enough
/// to keep memory bounded for multi-terabyte disks.
pub(crate) const COPY_CHUNK: u64 = 1 << 20;

/// Granularity of hole detection in exports: the usual filesystem block size, so every zero
/// block becomes a real hole.
const ZERO_BLOCK: usize = 4096;

/// A qcow2 header's backing reference, both as stored and as resolved.
#[derive(Clone, Debug)]
pub(crate) struct BackingRef {
    /// Name exactly as stored in the header (may be relative to the image's directory).
    pub name: String,
    pub path: PathBuf,
    pub format: ImageFormat,
}

/// Resolves a backing name the way qemu does: relative names are relative to the directory of
/// the image that names them, not to the current directory.
pub(crate) fn resolve_backing(image: &Path, name: &Path) -> PathBuf {
    if name.is_absolute() {
        name.to_path_buf()
    } else {
        parent_dir(image).join(name)
    }
}

/// Reads the backing reference from a qcow2 header (through imago, without opening the backing
/// file). `Ok(None)` means the image has no backing file.
pub(crate) fn read_backing(image: &Path) -> Result<Option<BackingRef>> {
    let q = Qcow2::<File>::open_path(image, false).ctx("open qcow2 image", image)?;
    let Some(name) = q.implicit_backing_file().cloned() else {
        return Ok(None);
    };
    let path = resolve_backing(image, Path::new(&name));
    match fs::metadata(&path) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(DiskError::BackingMissing {
                image: image.to_path_buf(),
                backing: path,
            });
        }
        Err(e) => return Err(DiskError::io("stat", &path, e)),
    }
    let format = match q.implicit_backing_format() {
        Some(f) => {
            ImageFormat::from_backing_format(f).ok_or_else(|| DiskError::UnsupportedFormat {
                image: image.to_path_buf(),
                format: f.clone(),
            })?
        }
        // Images we create always record the format; only foreign qcow2 bases may omit it, and
        // their backing files predate any guest, so probing them is safe.
        None => probe(&path)?,
    };
    Ok(Some(BackingRef { name, path, format }))
}

/// The chain from `top` down to the base: element 0 is `top` itself, the last element is the
/// image without a backing file. Paths are resolved (relative names joined to the directory of
/// the image naming them).
pub fn backing_chain(top: &Path) -> Result<Vec<(PathBuf, ImageFormat)>> {
    let mut chain = Vec::new();
    let mut seen = HashSet::new();
    let mut current = Some((top.to_path_buf(), probe(top)?));
    while let Some((path, format)) = current {
        let id = file_id(&path).ctx("stat", &path)?;
        if !seen.insert(id) || chain.len() >= MAX_CHAIN_DEPTH {
            return Err(DiskError::ChainTooDeep {
                path: top.to_path_buf(),
            });
        }
        current = match format {
            ImageFormat::Raw => None,
            ImageFormat::Qcow2 => read_backing(&path)?.map(|b| (b.path, b.format)),
        };
        chain.push((path, format));
    }
    Ok(chain)
}

/// Opens a single image. Backing layers are always passed explicitly, so imago never opens or
/// probes anything on its own (the gate denies implicit opens).
pub(crate) fn open_layer(
    path: &Path,
    format: ImageFormat,
    backing: Option<Layer>,
    writable: bool,
) -> Result<Layer> {
    // The storage is opened here rather than via `builder_path`, which would route even the
    // image itself through the (denying) gate.
    let opts = StorageOpenOptions::new().filename(path).write(writable);
    let file = File::open(opts).ctx("open", path)?;
    let gate = DenyImplicitOpenGate::default();
    match format {
        ImageFormat::Raw => Raw::builder(file)
            .write(writable)
            .open(gate)
            .map(FormatAccess::new)
            .ctx("open raw image", path),
        ImageFormat::Qcow2 => Qcow2::<File>::builder(file)
            .write(writable)
            .backing(backing)
            .open(gate)
            .map(FormatAccess::new)
            .ctx("open qcow2 image", path),
    }
}

/// Opens the full chain under `top`; only `top` itself may be writable, every backing layer is
/// opened read-only so the base can never be written through this module.
pub(crate) fn open_chain(top: &Path, writable_top: bool) -> Result<Layer> {
    let chain = backing_chain(top)?;
    let mut below: Option<Layer> = None;
    for (i, (path, format)) in chain.iter().enumerate().rev() {
        below = Some(open_layer(
            path,
            *format,
            below.take(),
            writable_top && i == 0,
        )?);
    }
    below.ok_or_else(|| DiskError::io("open", top, io::Error::other("empty backing chain")))
}

/// Opens just the top image, without its backing file, to learn what *it* allocates.
pub(crate) fn open_alone(path: &Path) -> Result<Layer> {
    open_layer(path, probe(path)?, None, false)
}

/// Guest-visible size of one image in `format`, as imago reads it (a qcow2's
/// header, a raw file's length), without opening its backing file.
pub fn virtual_size(path: &Path, format: ImageFormat) -> Result<u64> {
    Ok(open_layer(path, format, None, false)?.size())
}

/// Cluster size of a qcow2 layer (imago reports it as the zero granularity of v3 images).
pub(crate) fn cluster_size(layer: &Layer) -> Option<u64> {
    layer.inner().zero_granularity()
}

/// Calls `sink(offset, data)` for every range of `view` that may be non-zero, in order, in pieces
/// of at most `COPY_CHUNK`. Ranges the format already knows to be zero are skipped unread.
pub(crate) fn for_each_data(
    view: &Layer,
    path: &Path,
    mut sink: impl FnMut(u64, &[u8]) -> Result<()>,
) -> Result<()> {
    let size = view.size();
    let mut buf = vec![0u8; COPY_CHUNK as usize];
    let mut offset = 0;
    while offset < size {
        let want = (size - offset).min(COPY_CHUNK);
        let (mapping, len) = view.get_mapping(offset, want).ctx("map", path)?;
        let len = len.min(want);
        match mapping {
            Mapping::Eof { .. } => break,
            Mapping::Zero { .. } => {}
            _ => {
                let data = &mut buf[..len as usize];
                view.read(&mut *data, offset).ctx("read", path)?;
                sink(offset, data)?;
            }
        }
        offset += len;
    }
    Ok(())
}

/// Splits `data` into maximal runs of non-zero `ZERO_BLOCK`s, so zero blocks become holes.
fn nonzero_runs(data: &[u8]) -> impl Iterator<Item = (usize, usize)> + '_ {
    let blocks = data.len().div_ceil(ZERO_BLOCK);
    let is_zero = move |i: usize| {
        let end = ((i + 1) * ZERO_BLOCK).min(data.len());
        data[i * ZERO_BLOCK..end].iter().all(|&b| b == 0)
    };
    let mut i = 0;
    std::iter::from_fn(move || {
        while i < blocks && is_zero(i) {
            i += 1;
        }
        if i == blocks {
            return None;
        }
        let start = i;
        while i < blocks && !is_zero(i) {
            i += 1;
        }
        Some((
            start * ZERO_BLOCK,
            (i * ZERO_BLOCK).min(data.len()) - start * ZERO_BLOCK,
        ))
    })
}

/// Flattens the chain under `top` into a standalone image at `out` (no backing file). For raw,
/// zero runs become holes and the result equals `qemu-img convert -O raw` byte for byte. `out`
/// is written under a temp name and renamed into place, so a crash never leaves a half export.
pub fn export_flat(top: &Path, out: &Path, format: ImageFormat) -> Result<()> {
    export_flat_with_progress(top, out, format, &mut |_, _| {})
}

/// [`export_flat`], telling `progress(done, total)` (virtual bytes) as it goes.
pub fn export_flat_with_progress(
    top: &Path,
    out: &Path,
    format: ImageFormat,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<()> {
    let view = open_chain(top, false)?;
    // Renaming over a chain member would swap a layer out from under every VM using it.
    for (member, _) in backing_chain(top)? {
        if same_file(&member, out) {
            return Err(DiskError::io(
                "export to",
                out,
                io::Error::other("it is part of the chain being exported"),
            ));
        }
    }
    let size = view.size();
    let tmp = fsutil::reusable_temp_path(out).ctx("name a temp file for", out)?;
    remove_if_exists(&tmp)?;
    match format {
        ImageFormat::Raw => {
            let file = crate::paths::create_private_file(&tmp, true).ctx("create", &tmp)?;
            file.set_len(size).ctx("resize", &tmp)?;
            for_each_data(&view, top, |offset, data| {
                for (start, len) in nonzero_runs(data) {
                    file.write_all_at(&data[start..start + len], offset + start as u64)
                        .ctx("write", &tmp)?;
                }
                progress(offset + data.len() as u64, size);
                Ok(())
            })?;
            file.sync_all().ctx("fsync", &tmp)?;
        }
        ImageFormat::Qcow2 => {
            create_qcow2(&tmp, size, None, None)?;
            let dst = open_layer(&tmp, ImageFormat::Qcow2, None, true)?;
            for_each_data(&view, top, |offset, data| {
                for (start, len) in nonzero_runs(data) {
                    dst.write(&data[start..start + len], offset + start as u64)
                        .ctx("write", &tmp)?;
                }
                progress(offset + data.len() as u64, size);
                Ok(())
            })?;
            dst.flush().ctx("flush", &tmp)?;
            dst.sync().ctx("fsync", &tmp)?;
        }
    }
    progress(size, size);
    fs::rename(&tmp, out).ctx("rename export onto", out)?;
    fsutil::fsync_dir(parent_dir(out)).ctx("fsync directory", parent_dir(out))
}

pub(crate) fn remove_if_exists(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(DiskError::io("remove", path, e)),
    }
}

/// Formats `path` (created or truncated) as an empty qcow2 of `size` bytes via imago, then
/// fsyncs it. `backing` is (name as it should be stored, format).
pub(crate) fn create_qcow2(
    path: &Path,
    size: u64,
    backing: Option<(&str, ImageFormat)>,
    cluster_size: Option<u64>,
) -> Result<()> {
    let opts = StorageCreateOptions::new().filename(path).overwrite(true);
    let file = File::create_open(opts).ctx("create", path)?;
    // imago creates with the umask's mode; nothing is written yet.
    crate::paths::set_mode(path, crate::paths::file_mode()).ctx("chmod", path)?;
    let mut builder = Qcow2::<File>::create_builder(file).size(size);
    if let Some((name, format)) = backing {
        builder = builder.backing(name.to_string(), format.as_str().to_string());
    }
    if let Some(cs) = cluster_size {
        builder = builder.cluster_size(cs as usize);
    }
    builder.create().ctx("format qcow2", path)?;
    fsutil::fsync_file(path).ctx("fsync", path)
}
