//! The floor under a reset on this host: what one input costs with no
//! reset work at all. A bare KVM_RUN round trip (registers put back through
//! `kvm_run`, the guest runs its input to the DONE doorbell), the extra
//! KVM_RUN with `immediate_exit` that finishes an MMIO access, one cheap
//! vCPU ioctl, and a hand-off between two threads (a futex wake each way).
//! `rewind bench reset` prints them beside the resets per second, so the
//! figures say how far a reset is from what the host allows.

use std::sync::mpsc::channel;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_regs;
use kvm_ioctls::{SyncReg, VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMemory;

/// Medians, each per operation.
#[derive(Debug, Clone, Copy, Default)]
pub struct Floor {
    /// Registers back through `kvm_run`, then KVM_RUN until the guest's
    /// DONE doorbell: the input's run and nothing else.
    pub kvm_run: Duration,
    /// KVM_RUN with `immediate_exit` set (no guest entry): what finishing
    /// an in-flight MMIO access costs.
    pub immediate_exit_run: Duration,
    /// KVM_GET_MP_STATE: the price of any one vCPU ioctl.
    pub vcpu_ioctl: Duration,
    /// One thread waking another through a channel (half a ping-pong).
    pub hand_off: Duration,
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

/// Runs the stopped vCPU from `regs` to the MMIO write at `done_gpa`,
/// `runs` times. Between runs only the stack (`stack`: its guest-physical
/// address and bytes at the snapshot) is put back, since the doorbell
/// call's return address lives there, and `rearm` takes KVM's dirty log
/// (untimed), so each run's first write to a page faults as after a reset.
/// The rest of memory is left as the inputs made it.
pub(crate) fn vcpu_floor(
    fd: &mut VcpuFd,
    mem: &GuestMemory,
    regs: &kvm_regs,
    stack: &(u64, Vec<u8>),
    done_gpa: u64,
    runs: usize,
    rearm: &mut dyn FnMut() -> Result<(), String>,
) -> Result<Floor, String> {
    let mut run = Vec::with_capacity(runs);
    let mut immediate = Vec::with_capacity(runs);
    let mut ioctl = Vec::with_capacity(runs);
    // The kick that delivered this task set it; the guest must run here.
    fd.set_kvm_immediate_exit(0);
    fd.set_sync_valid_reg(SyncReg::Register);
    for _ in 0..runs {
        rearm()?;
        let t = Instant::now();
        mem.write_slice(&stack.1, GuestAddress(stack.0))
            .map_err(|e| e.to_string())?;
        fd.sync_regs_mut().regs = *regs;
        fd.set_sync_dirty_reg(SyncReg::Register);
        loop {
            let r = fd.run();
            match r {
                Ok(VcpuExit::MmioWrite(addr, _)) if addr == done_gpa => break,
                Ok(VcpuExit::Intr) => {}
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
                Ok(other) => return Err(format!("unexpected exit on the way to DONE: {other:?}")),
                Err(e) => return Err(format!("KVM_RUN failed: {e}")),
            }
        }
        run.push(t.elapsed());

        let t = Instant::now();
        crate::kvm::vcpu::complete_in_flight_io(fd);
        immediate.push(t.elapsed());

        let t = Instant::now();
        fd.get_mp_state().map_err(|e| e.to_string())?;
        ioctl.push(t.elapsed());
    }
    Ok(Floor {
        kvm_run: median(run),
        immediate_exit_run: median(immediate),
        vcpu_ioctl: median(ioctl),
        hand_off: Duration::ZERO,
    })
}

/// Half the median round trip of a message to another thread and back,
/// each side blocked in a channel receive (a futex wait) until woken.
pub fn hand_off(rounds: usize) -> Duration {
    let (to_peer, peer_rx) = channel::<()>();
    let (to_us, our_rx) = channel::<()>();
    let peer = std::thread::spawn(move || {
        while peer_rx.recv().is_ok() {
            if to_us.send(()).is_err() {
                break;
            }
        }
    });
    let mut trips = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        if to_peer.send(()).is_err() || our_rx.recv().is_err() {
            break;
        }
        trips.push(t.elapsed());
    }
    drop(to_peer);
    let _ = peer.join();
    median(trips) / 2
}
