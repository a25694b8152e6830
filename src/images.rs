//! The Linux guest images, built on first use by the recipe in
//! guest-images/linux (Debian packages only; outputs cached outside the
//! repository, keyed by a hash of every input). The recipe is compiled into
//! the binary, so `rewind run --guest linux` works from any directory.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot stage the image recipe in {path}: {source}")]
    Stage {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot run the image recipe (bash {path}): {source}")]
    Spawn {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "building the Linux guest images failed (exit {0}); its progress lines above say where"
    )]
    Failed(i32),
    #[error("the image recipe did not produce {0}")]
    Missing(PathBuf),
}

/// The recipe's files, as `(relative path, contents, executable)`.
const RECIPE: &[(&str, &str, bool)] = &[
    (
        "build.sh",
        include_str!("../guest-images/linux/build.sh"),
        true,
    ),
    (
        "microvm.config",
        include_str!("../guest-images/linux/microvm.config"),
        false,
    ),
    (
        "debian-versions",
        include_str!("../guest-images/linux/debian-versions"),
        false,
    ),
    ("init", include_str!("../guest-images/linux/init"), true),
    ("agent", include_str!("../guest-images/linux/agent"), true),
    (
        "fuzz-helper/rewind_fuzz.h",
        include_str!("../guest-images/fuzz-helper/rewind_fuzz.h"),
        false,
    ),
    (
        "fuzz-helper/example_target.c",
        include_str!("../guest-images/fuzz-helper/example_target.c"),
        false,
    ),
    (
        "patches/0001-pvm-complete-syscall-in-page-fault.patch",
        include_str!("../guest-images/linux/patches/0001-pvm-complete-syscall-in-page-fault.patch"),
        false,
    ),
];

#[derive(Debug, Clone)]
pub struct LinuxImages {
    pub dir: PathBuf,
}

impl LinuxImages {
    /// The microvm kernel (ELF vmlinux, no ACPI, MP table, command-line virtio devices).
    pub fn microvm(&self) -> PathBuf {
        self.dir.join("vmlinux-microvm")
    }
    /// Debian's cloud kernel, as the ELF taken out of its bzImage.
    pub fn stock(&self) -> PathBuf {
        self.dir.join("vmlinux-stock")
    }
    pub fn initramfs(&self) -> PathBuf {
        self.dir.join("initramfs.cpio")
    }
    pub fn initramfs_stock(&self) -> PathBuf {
        self.dir.join("initramfs-stock.cpio")
    }
    /// An ext4 root disk with the initramfs's contents (`--disk ... --root`).
    pub fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs.ext4")
    }
}

fn cache_root() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/tmp"))
        .join("rewind")
}

fn stage(dir: &Path) -> Result<(), ImageError> {
    use std::os::unix::fs::PermissionsExt;
    let err = |source| ImageError::Stage {
        path: dir.to_path_buf(),
        source,
    };
    for (rel, text, exec) in RECIPE {
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(err)?;
        }
        if std::fs::read_to_string(&path).ok().as_deref() != Some(*text) {
            std::fs::write(&path, text).map_err(err)?;
        }
        let mode = if *exec { 0o755 } else { 0o644 };
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).map_err(err)?;
    }
    Ok(())
}

/// Builds (or finds in the cache) every Linux guest artefact. Progress goes
/// to stderr; a cached rerun takes well under a second.
pub fn linux_images() -> Result<LinuxImages, ImageError> {
    let recipe = cache_root().join("recipe");
    stage(&recipe)?;
    let script = recipe.join("build.sh");
    let spawn_err = |source| ImageError::Spawn {
        path: script.clone(),
        source,
    };
    let mut child = Command::new("bash")
        .arg(&script)
        .arg("all")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_err)?;
    // The script announces each step on stderr (`rewind-image [ 12s] STEP`):
    // on a terminal the live line shows the step running, without one the
    // lines pass as they are (one per phase); anything else is shown as is.
    let stderr = child.stderr.take();
    let relay = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut phase: Option<crate::progress::Phase> = None;
        for line in stderr
            .map(std::io::BufReader::new)
            .into_iter()
            .flat_map(|r| r.lines())
            .map_while(Result::ok)
        {
            let step = line
                .strip_prefix("rewind-image [")
                .and_then(|r| r.split_once("] "))
                .map(|(_, step)| step.to_string());
            if step.is_some() && phase.is_none() && crate::progress::enabled() {
                phase = Some(crate::progress::Phase::spinner("Linux guest images"));
            }
            match (&phase, step) {
                (Some(p), Some(step)) if p.is_live() => p.message(&step),
                (Some(p), _) => p.println(&line),
                (None, _) => eprintln!("{line}"),
            }
        }
        if let Some(p) = phase {
            p.finish();
        }
    });
    let out = child.wait_with_output().map_err(spawn_err)?;
    let _ = relay.join();
    if !out.status.success() {
        return Err(ImageError::Failed(out.status.code().unwrap_or(-1)));
    }
    let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let images = LinuxImages { dir };
    for p in [images.microvm(), images.initramfs(), images.rootfs()] {
        if !p.is_file() {
            return Err(ImageError::Missing(p));
        }
    }
    Ok(images)
}
