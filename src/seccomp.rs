//! Seccomp filters, one per kind of thread in a VM's process, and the one
//! place that says which system calls each may make (x86-64).
//!
//! A VM process runs these kinds of thread (`rewind run`, `rewind restore`):
//! - **vcpu**: one per vCPU, `KVM_RUN` and the state ioctls; device
//!   registers it reaches (UART, debug console, virtio-mmio) signal the
//!   event loop through eventfds and channels.
//! - **console**: writes guest output to stdout, a file or a pipe.
//! - **mem-upkeep**: puts guest RAM back into huge pages after a live
//!   snapshot's writer exits, and reads a new snapshot's memory back into
//!   the page cache (`memory::upkeep`).
//! - **fuzzer**: `rewind fuzz`'s main thread, which runs the vCPU and the
//!   resets itself once the target is booted.
//! - **vmm**: the main thread once the VM is built: the event loop, every
//!   device's back end (virtio-blk on qcow2 files), the control API, the
//!   exec agent link on COM2, snapshot create/revert/delete, the boot cache,
//!   and the VM folder's cleanup at the end.
//!
//! Each list is `COMMON` (what Rust's runtime, the allocator and a
//! thread's exit need) plus that kind's own. To let a thread make a new
//! call, add it to its list below with a word on who needs it. A thread
//! that makes any other call gets SIGSYS; the handler here prints one line
//! naming the thread and the call's number (`ausyscall NUMBER` names it)
//! and ends the process with status 159 (128 + SIGSYS). `--no-seccomp`
//! turns every filter off, for debugging.
//!
//! The main thread starts no threads once filtered. It does fork one kind
//! of process: a live snapshot's memory writer (`snapshot::live`), which
//! inherits VMM's filter, writes and syncs one file and exits. So VMM allows
//! `clone` only with exactly the flags of a fork (no shared memory, no new
//! thread), `wait4` to reap the writer, and `getppid` for the writer's check
//! that its parent still lives. It still cannot execute anything, so a
//! fork gives a compromised thread nothing it did not have.
//!
//! Arguments are not filtered except a vCPU's ioctl type and clone's flags: the lists keep
//! a compromised thread from opening sockets, executing programs, tracing
//! or signalling other processes and changing its credentials.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot build the {kind} thread's seccomp filter: {detail}")]
    Build { kind: &'static str, detail: String },
    #[error(
        "cannot install the {kind} thread's seccomp filter: {detail} (--no-seccomp runs without)"
    )]
    Apply { kind: &'static str, detail: String },
    #[error("cannot install the SIGSYS handler: {0}")]
    Handler(std::io::Error),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Thread {
    Vcpu,
    Console,
    Vmm,
    Upkeep,
    Fuzzer,
}

impl Thread {
    pub fn name(self) -> &'static str {
        match self {
            Thread::Vcpu => "vcpu",
            Thread::Console => "console",
            Thread::Vmm => "vmm",
            Thread::Upkeep => "mem-upkeep",
            Thread::Fuzzer => "fuzzer",
        }
    }

    fn own(self) -> &'static [i64] {
        match self {
            Thread::Vcpu => VCPU,
            Thread::Console => CONSOLE,
            Thread::Vmm => VMM,
            Thread::Upkeep => UPKEEP,
            Thread::Fuzzer => FUZZER,
        }
    }
}

/// Every thread: Rust's runtime and glibc (locks, allocation, a thread's
/// exit, aborts), the signal that kicks a vCPU, and this file's SIGSYS
/// handler (write, exit_group).
const COMMON: &[i64] = &[
    libc::SYS_futex,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_mprotect,
    libc::SYS_brk,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_getrandom,
    libc::SYS_gettid,
    libc::SYS_getpid,
    // abort() raises SIGABRT on itself; a crash should say so, not SIGSYS.
    libc::SYS_tgkill,
    libc::SYS_restart_syscall,
];

/// KVM ioctls only (run, capture, apply, kvmclock), eventfd reads and writes
/// (irqfds, waking the event loop), closing its vCPU fd when it ends; the
/// emulation assist reads guest memory through the mapping (no calls).
const VCPU: &[i64] = &[libc::SYS_ioctl, libc::SYS_read, libc::SYS_close];

/// `rewind fuzz`'s main thread once the target is booted: it runs the vCPU
/// itself (`kvm::vcpu_inline`) and resets the VM between inputs, so it has
/// a vCPU thread's calls (KVM ioctls only) plus the run deadline's timer,
/// reads of the vCPU's statistics fd, writing the crashing input out, and
/// looking for the VM's folder to remove when it ends (realpath, statx).
const FUZZER: &[i64] = &[
    libc::SYS_ioctl,
    libc::SYS_read,
    libc::SYS_close,
    libc::SYS_timer_create,
    libc::SYS_timer_settime,
    libc::SYS_timer_delete,
    libc::SYS_pread64,
    libc::SYS_openat,
    libc::SYS_statx,
    libc::SYS_readlink,
];

/// Writes to stdout, a file or a pipe (in COMMON); closes a file or pipe
/// it owns when the VM ends.
const CONSOLE: &[i64] = &[libc::SYS_close, libc::SYS_fcntl];

/// Collapses guest RAM back into huge pages (`madvise`, in COMMON) and
/// reads snapshot files back into the page cache: finds their data, starts
/// readahead, closes them (`memory::upkeep`).
const UPKEEP: &[i64] = &[
    libc::SYS_lseek,
    libc::SYS_fadvise64,
    libc::SYS_fstat,
    libc::SYS_statx,
    libc::SYS_close,
];

const VMM: &[i64] = &[
    // Files: snapshots, disk layers (imago), manifests, the boot cache.
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_lseek,
    libc::SYS_openat,
    libc::SYS_close,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_fstatfs,
    libc::SYS_statfs,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    // Starts a snapshot's files' writeback before their fsyncs (fsutil).
    libc::SYS_sync_file_range,
    libc::SYS_ftruncate,
    libc::SYS_fallocate,
    libc::SYS_fadvise64,
    libc::SYS_copy_file_range,
    libc::SYS_sendfile,
    libc::SYS_flock,
    libc::SYS_fcntl,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_getdents64,
    libc::SYS_getcwd,
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_access,
    // Crash-safe publishing: temp names, rename, link, fsync the directory.
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_link,
    libc::SYS_linkat,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_rmdir,
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_chmod,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_utimensat,
    // KVM (slots, dirty log, irqfds, vCPU kicks), the terminal (raw mode).
    libc::SYS_ioctl,
    // The event loop: epoll, eventfds, signalfd, timers.
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_pwait2,
    libc::SYS_eventfd2,
    libc::SYS_signalfd4,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigtimedwait,
    // The control socket: already bound, so accepting and talking only.
    libc::SYS_accept4,
    libc::SYS_accept,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    // Guest memory: MAP_PRIVATE restores, revert copies, dirty tracking.
    libc::SYS_mincore,
    libc::SYS_msync,
    libc::SYS_memfd_create,
    libc::SYS_uname,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    libc::SYS_prlimit64,
    libc::SYS_sysinfo,
    libc::SYS_prctl,
    // Live snapshots: fork the memory writer (clone: fork's flags only, see
    // `program`), reap it; in the writer, its parent check and the test-only
    // stall (`pause`).
    libc::SYS_clone,
    libc::SYS_wait4,
    libc::SYS_getppid,
    libc::SYS_pause,
    // The event loop wakes when a live snapshot's writer exits.
    libc::SYS_pidfd_open,
    // glibc's fork resets the child's robust futex list.
    libc::SYS_set_robust_list,
];

/// Off unless the binary turns it on, so the library's own tests and other
/// users of it are never filtered.
static ENABLED: AtomicBool = AtomicBool::new(false);

/// Turns filters on for the threads this process starts from now on.
pub fn enable() {
    ENABLED.store(true, Ordering::Relaxed);
}

pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

thread_local! {
    /// Read by the SIGSYS handler to name the thread.
    static KIND: Cell<&'static str> = const { Cell::new("unfiltered") };
}

/// The allow-list of `kind`, sorted and without duplicates.
pub fn allowed(kind: Thread) -> Vec<i64> {
    let mut v: Vec<i64> = COMMON.iter().chain(kind.own()).copied().collect();
    v.sort_unstable();
    v.dedup();
    v
}

fn program(kind: Thread) -> Result<BpfProgram, SeccompError> {
    let build = |detail: String| SeccompError::Build {
        kind: kind.name(),
        detail,
    };
    let mut rules = BTreeMap::new();
    for nr in allowed(kind) {
        let only = if matches!(kind, Thread::Vcpu | Thread::Fuzzer) && nr == libc::SYS_ioctl {
            vec![kvm_ioctls_only().map_err(|e| build(e.to_string()))?]
        } else if nr == libc::SYS_clone {
            vec![fork_only().map_err(|e| build(e.to_string()))?]
        } else {
            vec![]
        };
        rules.insert(nr, only);
    }
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|e| build(e.to_string()))?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| build(e.to_string()))
}

/// A vCPU thread's ioctls are all KVM's (type 0xAE in the request number):
/// it has no business with terminals, sockets or block devices.
fn kvm_ioctls_only() -> Result<SeccompRule, seccompiler::BackendError> {
    let cond = SeccompCondition::new(
        1,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(0xff00),
        u64::from(KVMIO) << 8,
    )?;
    SeccompRule::new(vec![cond])
}

/// `clone` with exactly the flags glibc's `fork()` passes: a new process
/// with its own memory, not a thread and nothing shared.
fn fork_only() -> Result<SeccompRule, seccompiler::BackendError> {
    let flags = libc::CLONE_CHILD_CLEARTID | libc::CLONE_CHILD_SETTID | libc::SIGCHLD;
    let cond = SeccompCondition::new(0, SeccompCmpArgLen::Qword, SeccompCmpOp::Eq, flags as u64)?;
    SeccompRule::new(vec![cond])
}

/// The ioctl type of every KVM request (`linux/kvm.h`).
const KVMIO: u32 = 0xAE;

/// Whether the calling thread runs under a filter (then it cannot open
/// sockets, for one).
pub fn filtered_here() -> bool {
    KIND.with(|k| k.get() != "unfiltered")
}

/// Installs `kind`'s filter on the calling thread when filters are on.
/// Threads it starts afterwards inherit the filter (and may add theirs).
pub fn install(kind: Thread) -> Result<(), SeccompError> {
    if !enabled() {
        return Ok(());
    }
    let prog = program(kind)?;
    install_sigsys_handler()?;
    // Read before the filter: the probe is a test hook, see `probe`.
    let probe = std::env::var("REWIND_TEST_SECCOMP_PROBE").ok();
    KIND.with(|k| k.set(kind.name()));
    seccompiler::apply_filter(&prog).map_err(|e| SeccompError::Apply {
        kind: kind.name(),
        detail: e.to_string(),
    })?;
    match probe.as_deref() {
        Some(p) if p == kind.name() => self::probe(),
        Some("vcpu-ioctl") if kind == Thread::Vcpu => probe_ioctl(),
        _ => {}
    }
    Ok(())
}

/// [`install`] for a thread that has nobody to report an error to: a
/// filter that cannot be installed ends the process with one line, since
/// running on unfiltered is what `--no-seccomp` is for.
pub fn install_or_exit(kind: Thread) {
    if let Err(e) = install(kind) {
        eprintln!("rewind: {e}");
        std::process::exit(1);
    }
}

/// Test hook (`REWIND_TEST_SECCOMP_PROBE=vcpu|console|vmm`): the thread
/// makes a call no list allows, harmless when it is let through (chroot to
/// a path that does not exist), so a test sees the filter refuse it.
fn probe() {
    let path = c"/nonexistent-rewind-seccomp-probe";
    // SAFETY: chroot reads a NUL-terminated path that lives for the call;
    // the path does not exist, so without a filter it fails with ENOENT.
    unsafe { libc::syscall(libc::SYS_chroot, path.as_ptr()) };
}

/// `REWIND_TEST_SECCOMP_PROBE=vcpu-ioctl`: a vCPU thread asks for a
/// terminal's window size, an ioctl that is not KVM's.
fn probe_ioctl() {
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes one winsize into `ws`, which outlives the
    // call; on a non-terminal it fails with ENOTTY and writes nothing.
    unsafe { libc::ioctl(2, libc::TIOCGWINSZ, &mut ws) };
}

fn install_sigsys_handler() -> Result<(), SeccompError> {
    // SAFETY: a zeroed sigaction is valid; the handler only calls
    // async-signal-safe functions (write, _exit) and reads a const
    // thread-local without a destructor.
    unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = on_sigsys as *const () as usize;
        act.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut act.sa_mask);
        if libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut()) != 0 {
            return Err(SeccompError::Handler(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// Offset of `si_syscall` in the SIGSYS `siginfo_t` on x86-64 (after
/// signo, errno, code, padding and `si_call_addr`); the libc crate has no
/// accessor for it.
const SI_SYSCALL_OFFSET: usize = 24;

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for SA_SIGINFO handlers,
    // and for SIGSYS the int at SI_SYSCALL_OFFSET is the system call.
    let nr = unsafe {
        std::ptr::read_unaligned((info as *const u8).add(SI_SYSCALL_OFFSET) as *const i32)
    };
    let kind = KIND.with(|k| k.get());
    let mut digits = [0u8; 12];
    let mut i = digits.len();
    let mut n = nr.unsigned_abs();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let parts: [&[u8]; 5] = [
        b"rewind: seccomp: the ",
        kind.as_bytes(),
        b" thread made system call ",
        &digits[i..],
        b", which its filter forbids (lists in src/seccomp.rs; --no-seccomp turns filters off)\n",
    ];
    // One write, so lines other threads print cannot land inside it.
    let mut line = [0u8; 256];
    let mut len = 0;
    for p in parts {
        let n = p.len().min(line.len() - len);
        line[len..len + n].copy_from_slice(&p[..n]);
        len += n;
    }
    // SAFETY: write(2) of a live buffer; async-signal-safe.
    unsafe { libc::write(2, line.as_ptr().cast(), len) };
    // SAFETY: _exit is async-signal-safe and ends the whole process.
    unsafe { libc::_exit(128 + libc::SIGSYS) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_filter_builds_and_no_list_allows_the_dangerous_calls() {
        for kind in [
            Thread::Vcpu,
            Thread::Console,
            Thread::Vmm,
            Thread::Upkeep,
            Thread::Fuzzer,
        ] {
            program(kind).unwrap();
            let allowed = allowed(kind);
            for bad in [
                libc::SYS_execve,
                libc::SYS_execveat,
                libc::SYS_socket,
                libc::SYS_connect,
                libc::SYS_ptrace,
                libc::SYS_kill,
                libc::SYS_setuid,
                libc::SYS_mount,
                libc::SYS_chroot,
                libc::SYS_fork,
                libc::SYS_vfork,
                libc::SYS_clone3,
            ] {
                assert!(!allowed.contains(&bad), "{kind:?} allows {bad}");
            }
        }
    }
}
