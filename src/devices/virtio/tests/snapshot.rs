use vm_memory::{Bytes, GuestAddress};

use super::super::block::S_OK;
use super::super::MmioState;
use super::*;
use crate::snapshot::persist::Persist;

/// What rewind does with the state: it goes through serde to a file.
fn through_serde(s: &MmioState) -> MmioState {
    serde_json::from_str(&serde_json::to_string(s).unwrap()).unwrap()
}

#[test]
fn save_restore_continues_the_queue() {
    let disk = TempDisk::new(DISK_SECTORS);
    let mem = new_mem();
    let mut dev = new_dev(&mem, &disk, false);
    let mut vq = handshake(&mut dev, u64::MAX);
    mem.write_slice(&[0x5a; 512], GuestAddress(DATA)).unwrap();
    for _ in 0..3 {
        vq.request(&mem, T_OUT, 2, Some((DATA, 512, 0)));
        notify(&mut dev);
    }
    assert!(irq_fired(&dev));
    let saved = through_serde(&dev.save());
    assert_eq!(saved.version, 1);
    assert_eq!(saved.queues[0].next_avail, 3);
    assert_eq!(saved.queues[0].next_used, 3);
    assert!(saved.queues[0].ready && saved.queues[0].event_idx && saved.activated);
    assert_eq!(saved.interrupt_status, 1);
    drop(dev);

    // A new process: fresh device, same guest memory contents and disk.
    let mut dev = new_dev(&mem, &disk, false);
    dev.restore(&saved).unwrap();
    assert_eq!(dev.save(), saved);
    assert_eq!(dev.device().acked_features(), saved.driver_features);
    assert_eq!(rd(&mut dev, 0x70), saved.device_status);
    assert_eq!(rd(&mut dev, 0x60), 1);
    wr(&mut dev, 0x64, 1);

    let head = vq.request(&mem, T_IN, 2, Some((DATA + 0x1000, 512, F_WRITE)));
    notify(&mut dev);
    assert_eq!(used_idx(&mem), 4, "continues after the restored position");
    assert_eq!(used_elem(&mem, 3), (u32::from(head), 513));
    assert_eq!(status_byte(&mem), S_OK);
    assert!(guest_bytes(&mem, DATA + 0x1000, 512)
        .iter()
        .all(|&b| b == 0x5a));
    assert!(irq_fired(&dev));
    assert_eq!(dev.save().queues[0].next_avail, 4);
}

#[test]
fn kick_after_restore_processes_pending_requests() {
    let disk = TempDisk::new(DISK_SECTORS);
    let mem = new_mem();
    let mut dev = new_dev(&mem, &disk, false);
    let mut vq = handshake(&mut dev, u64::MAX);
    vq.request(&mem, T_FLUSH, 0, None);
    notify(&mut dev);
    wr(&mut dev, 0x64, 1);
    assert!(irq_fired(&dev));
    // Published and kicked through the ioeventfd, but the VM was paused
    // before the poll loop got to it: the kick lives only in the old fd.
    let head = vq.request(&mem, T_IN, 5, Some((DATA, 512, F_WRITE)));
    dev.queue_evts()[0].write(1).unwrap();
    let saved = dev.save();
    assert_eq!(saved.queues[0].next_avail, 1);

    let mut restored = new_dev(&mem, &disk, false);
    restored.restore(&saved).unwrap();
    assert_eq!(used_idx(&mem), 1);
    restored.kick_after_restore();
    assert_eq!(used_idx(&mem), 2);
    assert_eq!(used_elem(&mem, 1), (u32::from(head), 513));
    assert!(guest_bytes(&mem, DATA, 512).iter().all(|&b| b == 5));
    assert!(irq_fired(&restored));
    assert_eq!(rd(&mut restored, 0x60), 1);
    // Nothing pending: no interrupt.
    wr(&mut restored, 0x64, 1);
    restored.kick_after_restore();
    assert!(!irq_fired(&restored));
}

#[test]
fn kick_after_restore_reraises_pending_interrupt() {
    let disk = TempDisk::new(DISK_SECTORS);
    let mem = new_mem();
    let mut dev = new_dev(&mem, &disk, false);
    let mut vq = handshake(&mut dev, u64::MAX);
    vq.request(&mem, T_FLUSH, 0, None);
    notify(&mut dev);
    let saved = dev.save();
    assert_eq!(saved.interrupt_status, 1, "guest had not acked yet");
    let mut restored = new_dev(&mem, &disk, false);
    restored.restore(&saved).unwrap();
    restored.kick_after_restore();
    assert!(irq_fired(&restored));
}

#[test]
fn restore_of_unconfigured_device_and_revert_in_place() {
    let disk = TempDisk::new(DISK_SECTORS);
    let mem = new_mem();
    let mut dev = new_dev(&mem, &disk, false);
    let blank = dev.save();
    assert!(!blank.activated && !blank.queues[0].ready);
    let mut vq = handshake(&mut dev, u64::MAX);
    let live = dev.save();
    vq.request(&mem, T_FLUSH, 0, None);
    notify(&mut dev);
    // Revert in place to before the request; the guest's rings are reverted too.
    mem.write_obj(0u16, GuestAddress(USED + 2)).unwrap();
    dev.restore(&live).unwrap();
    assert_eq!(dev.save(), live);
    dev.kick_after_restore();
    assert_eq!(used_idx(&mem), 1, "the request is replayed exactly once");
    dev.restore(&blank).unwrap();
    assert_eq!(rd(&mut dev, 0x70), 0);
    assert_eq!(dev.device().acked_features(), 0);
}

#[test]
fn restore_rejects_bad_state_and_keeps_the_device() {
    let disk = TempDisk::new(DISK_SECTORS);
    let mem = new_mem();
    let mut dev = new_dev(&mem, &disk, false);
    handshake(&mut dev, u64::MAX);
    let good = dev.save();

    let mut bad = Vec::new();
    let mut s = good.clone();
    s.version = 99;
    bad.push(s);
    let mut s = good.clone();
    s.device_type = 1;
    bad.push(s);
    let mut s = good.clone();
    s.queues.push(s.queues[0].clone());
    bad.push(s);
    let mut s = good.clone();
    s.queues.clear();
    bad.push(s);
    let mut s = good.clone();
    s.queues[0].size = 12;
    bad.push(s);
    let mut s = good.clone();
    s.queues[0].size = 512;
    bad.push(s);
    let mut s = good.clone();
    s.queues[0].desc_table = 0x1001;
    bad.push(s);
    let mut s = good.clone();
    s.queues[0].used_ring = 0x3002;
    bad.push(s);
    let mut s = good.clone();
    s.driver_features |= 1 << 40;
    bad.push(s);
    let mut s = good.clone();
    s.device_status = 0;
    bad.push(s);
    for (i, s) in bad.iter().enumerate() {
        assert!(dev.restore(s).is_err(), "bad state {i} accepted");
        assert_eq!(dev.save(), good, "bad state {i} changed the device");
    }

    // Saved while writable, restored onto a read-only backend.
    let mut ro = new_dev(&mem, &disk, true);
    let mut s = good.clone();
    s.driver_features |= 1 << 14;
    assert!(ro.restore(&s).is_err());
}
