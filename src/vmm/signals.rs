//! Termination signals as a file descriptor the event loop polls.

/// SIGINT, SIGTERM and SIGHUP as a pollable fd, so a `kill` or Ctrl-C (when
/// the console is not raw) ends the VM through the normal exit path and the
/// terminal is restored. Must be created before any thread so the mask is
/// inherited.
pub struct SignalFd {
    pub fd: i32,
}

impl SignalFd {
    pub fn new() -> std::io::Result<SignalFd> {
        // SAFETY: sigset_t is plain data initialised by sigemptyset.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: all calls get valid pointers to `set`.
        let fd = unsafe {
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::sigaddset(&mut set, libc::SIGHUP);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK)
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(SignalFd { fd })
    }

    /// The pending signal's number, if one is pending.
    pub fn read(&self) -> Option<i32> {
        // SAFETY: signalfd_siginfo is plain data.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let len = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: reads at most `len` bytes into `info`, which is that large.
        let got = unsafe {
            libc::read(
                self.fd,
                (&mut info as *mut libc::signalfd_siginfo).cast(),
                len,
            )
        };
        (got as usize == len).then_some(info.ssi_signo as i32)
    }
}

impl Drop for SignalFd {
    fn drop(&mut self) {
        // SAFETY: closes the fd this struct owns.
        unsafe { libc::close(self.fd) };
    }
}
