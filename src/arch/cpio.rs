//! `--initrd DIR`: a directory packed on the fly as the "newc" cpio archive
//! Linux unpacks into its initramfs (Documentation/driver-api/
//! early-userspace/buffer-format.rst), so a developer drops a test program
//! into a directory and boots with it, without a cpio step.

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum CpioError {
    #[error("cannot pack initrd directory {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot pack {path} into the initrd: {what} does not fit a cpio header")]
    TooLarge {
        path: std::path::PathBuf,
        what: &'static str,
    },
}

/// Packs everything under `dir` (not `dir` itself: its contents become
/// the initramfs root), parents before children, names sorted, so the same
/// tree gives the same bytes. Files are owned by root in the archive, as
/// in the initramfs images distributions build; hard links are stored as
/// separate files.
pub fn pack_dir(dir: &Path) -> Result<Vec<u8>, CpioError> {
    let mut out = Vec::new();
    let mut ino = 1u32;
    walk(dir, dir, &mut out, &mut ino)?;
    entry(&mut out, "TRAILER!!!".as_bytes(), 0, 0, 1, 0, 0, &[]);
    Ok(out)
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CpioError + '_ {
    move |source| CpioError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<u8>, ino: &mut u32) -> Result<(), CpioError> {
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .map_err(io_err(dir))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .map_err(io_err(dir))?;
    names.sort();
    for path in names {
        let meta = std::fs::symlink_metadata(&path).map_err(io_err(&path))?;
        let name = path.strip_prefix(root).unwrap_or(&path);
        let name = name.as_os_str().as_bytes();
        let ft = meta.file_type();
        let data = if ft.is_file() {
            std::fs::read(&path).map_err(io_err(&path))?
        } else if ft.is_symlink() {
            std::fs::read_link(&path)
                .map_err(io_err(&path))?
                .as_os_str()
                .as_bytes()
                .to_vec()
        } else {
            Vec::new()
        };
        if data.len() > u32::MAX as usize {
            return Err(CpioError::TooLarge {
                path,
                what: "its size",
            });
        }
        let rdev = if ft.is_block_device() || ft.is_char_device() {
            meta.rdev()
        } else {
            0
        };
        let nlink = if ft.is_dir() { 2 } else { 1 };
        entry(
            out,
            name,
            *ino,
            meta.mode(),
            nlink,
            meta.mtime().clamp(0, u32::MAX as i64) as u32,
            rdev,
            &data,
        );
        *ino += 1;
        if ft.is_dir() {
            walk(root, &path, out, ino)?;
        }
    }
    Ok(())
}

/// One newc record: the 110-byte ASCII header, the name with its NUL, then
/// the data, each padded to 4 bytes.
#[allow(clippy::too_many_arguments)]
fn entry(
    out: &mut Vec<u8>,
    name: &[u8],
    ino: u32,
    mode: u32,
    nlink: u32,
    mtime: u32,
    rdev: u64,
    data: &[u8],
) {
    let (rmaj, rmin) = (libc::major(rdev), libc::minor(rdev));
    let fields = [
        ino,
        mode,
        0, // uid
        0, // gid
        nlink,
        mtime,
        data.len() as u32,
        0, // devmajor
        0, // devminor
        rmaj,
        rmin,
        name.len() as u32 + 1,
        0, // check (newc has none)
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name);
    out.push(0);
    pad4(out);
    out.extend_from_slice(data);
    pad4(out);
}

fn pad4(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_newc_and_aligned() {
        let dir = std::env::temp_dir().join(format!("rewind-cpio-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("bin")).unwrap();
        std::fs::write(dir.join("bin/hello"), b"hi\n").unwrap();
        std::os::unix::fs::symlink("bin/hello", dir.join("init")).unwrap();
        let a = pack_dir(&dir).unwrap();
        assert_eq!(a, pack_dir(&dir).unwrap(), "the same tree, the same bytes");
        let _ = std::fs::remove_dir_all(&dir);
        // Walk the records back: names in order, data where the sizes say.
        let mut at = 0;
        let mut seen = Vec::new();
        loop {
            assert_eq!(&a[at..at + 6], b"070701");
            let field = |i: usize| {
                let s = std::str::from_utf8(&a[at + 6 + 8 * i..at + 14 + 8 * i]).unwrap();
                u32::from_str_radix(s, 16).unwrap() as usize
            };
            let (size, namesize) = (field(6), field(11));
            let name = &a[at + 110..at + 110 + namesize - 1];
            assert_eq!(a[at + 110 + namesize - 1], 0);
            let data_at = (at + 110 + namesize).next_multiple_of(4);
            let data = &a[data_at..data_at + size];
            seen.push((String::from_utf8(name.to_vec()).unwrap(), data.to_vec()));
            at = (data_at + size).next_multiple_of(4);
            if name == b"TRAILER!!!" {
                break;
            }
        }
        assert_eq!(at, a.len());
        assert_eq!(
            seen,
            vec![
                ("bin".into(), vec![]),
                ("bin/hello".into(), b"hi\n".to_vec()),
                ("init".into(), b"bin/hello".to_vec()),
                ("TRAILER!!!".into(), vec![]),
            ]
        );
    }
}
