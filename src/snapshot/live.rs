//! Live snapshots: the guest's memory is written by a forked child while the
//! guest keeps running.
//!
//! The point in time is the `fork()`, made with every vCPU paused and after
//! the machine state is captured. From then on the child sees guest memory
//! exactly as it was at that instant (the kernel copies a page on write,
//! whoever writes it: a vCPU through KVM, or rewind's own device threads), so
//! the snapshot is of one instant with nothing to track page by page, for
//! anonymous and file-backed (restored) memory alike. The pause costs what
//! copying the page tables costs, which is why guest RAM asks for huge pages.
//!
//! The child only writes to files opened before the fork and exits: it makes
//! no allocation and takes no lock (another thread may have held one at the
//! fork). It dies with its parent (PR_SET_PDEATHSIG), so a killed VMM leaves
//! no writer behind, only an unpublished temp directory.

use std::ffi::CString;
use std::io;

/// A forked memory writer.
#[derive(Debug)]
pub struct Writer {
    pid: libc::pid_t,
}

/// Where the child should stop for a test (see `stall`), prepared before
/// the fork because the child may not read the environment.
pub struct StallMarker(Option<CString>);

impl StallMarker {
    pub fn for_point(phase: &str, name: &str) -> StallMarker {
        StallMarker(super::stall::marker_if_wanted(phase, name).and_then(|p| {
            use std::os::unix::ffi::OsStrExt;
            CString::new(p.as_os_str().as_bytes()).ok()
        }))
    }

    fn stop_if_wanted(&self) {
        if let Some(path) = &self.0 {
            // SAFETY: open/close/pause on a NUL-terminated path built before
            // the fork; no allocation, no lock.
            unsafe {
                let fd = libc::open(path.as_ptr(), libc::O_CREAT | libc::O_WRONLY, 0o600);
                if fd >= 0 {
                    libc::close(fd);
                }
                loop {
                    libc::pause();
                }
            }
        }
    }
}

/// Forks a child that runs `job` and exits with 0 on success or the errno of
/// its error. `job` must only make system calls on memory and descriptors
/// that exist before the fork.
pub fn spawn(stall: &StallMarker, job: impl FnOnce() -> io::Result<()>) -> io::Result<Writer> {
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };
    // SAFETY: fork in a multi-threaded process: the child runs only the code
    // below (system calls on pre-existing memory and descriptors, no
    // allocation, no lock) and then `_exit`s without running destructors.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: prctl/getppid/_exit are async-signal-safe system calls.
        unsafe {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            if libc::getppid() != parent {
                libc::_exit(libc::ESRCH);
            }
        }
        stall.stop_if_wanted();
        let code = match job() {
            Ok(()) => 0,
            Err(e) => e.raw_os_error().unwrap_or(libc::EIO).clamp(1, 255),
        };
        // SAFETY: as above.
        unsafe { libc::_exit(code) };
    }
    Ok(Writer { pid })
}

impl Writer {
    pub fn pid(&self) -> libc::pid_t {
        self.pid
    }

    /// Waits for the child; its failure as the error it exited with.
    pub fn wait(self) -> io::Result<()> {
        let mut status = 0;
        loop {
            // SAFETY: waits for our own child; `status` is a valid out pointer.
            let r = unsafe { libc::waitpid(self.pid, &mut status, 0) };
            if r == self.pid {
                break;
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        if libc::WIFEXITED(status) {
            match libc::WEXITSTATUS(status) {
                0 => Ok(()),
                errno => Err(io::Error::from_raw_os_error(errno)),
            }
        } else {
            Err(io::Error::other(format!(
                "the memory writer was killed by signal {}",
                libc::WTERMSIG(status)
            )))
        }
    }

    /// Lets the child finish and reaps it; the snapshot is abandoned. (Not
    /// killed: the seccomp filter allows signalling no process.)
    pub fn abandon(self) {
        let _ = self.wait();
    }
}
