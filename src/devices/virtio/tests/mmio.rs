use vm_memory::{Bytes, GuestAddress};

use super::super::status::NEEDS_RESET;
use super::*;
use crate::snapshot::persist::Persist;

fn fresh() -> (TempDisk, GuestMemory, MmioTransport<Block>) {
    let disk = TempDisk::new(DISK_SECTORS);
    let mem = new_mem();
    let dev = new_dev(&mem, &disk, false);
    (disk, mem, dev)
}

#[test]
fn identity_and_config_space() {
    let (_disk, _mem, mut dev) = fresh();
    assert_eq!(rd(&mut dev, 0x00), 0x7472_6976);
    assert_eq!(rd(&mut dev, 0x04), 2);
    assert_eq!(rd(&mut dev, 0x08), 2);
    assert_eq!(rd(&mut dev, 0x0c), u32::from_le_bytes(*b"RWND"));
    let f = device_features(&mut dev);
    for bit in [32, 2, 6, 9, 28, 29] {
        assert_ne!(f & (1 << bit), 0, "feature bit {bit}");
    }
    assert_eq!(f & (1 << 5), 0, "not read-only");
    wr(&mut dev, 0x14, 2);
    assert_eq!(rd(&mut dev, 0x10), 0, "feature page 2 is empty");

    // capacity as two 32-bit reads and as one 64-bit read
    assert_eq!(rd(&mut dev, 0x100), DISK_SECTORS as u32);
    assert_eq!(rd(&mut dev, 0x104), 0);
    let mut cap = [0u8; 8];
    dev.read(0x100, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), DISK_SECTORS);
    assert_eq!(rd(&mut dev, 0x10c), 128, "seg_max");
    assert_eq!(rd(&mut dev, 0x114), 512, "blk_size");
    let mut b = [0xffu8; 1];
    dev.read(0x114, &mut b);
    assert_eq!(b, [0], "byte read of blk_size low byte");
    dev.read(0x115, &mut b);
    assert_eq!(b, [2]);
    assert_eq!(rd(&mut dev, 0x1fc), 0, "beyond config reads zero");
    let mut far = [0xffu8; 4];
    dev.read(u64::MAX - 1, &mut far);
    assert_eq!(far, [0; 4]);
    wr(&mut dev, 0x100, 0xdead_beef);
    assert_eq!(
        rd(&mut dev, 0x100),
        DISK_SECTORS as u32,
        "config is read-only"
    );
    assert_eq!(rd(&mut dev, 0xfc), 0, "config generation");
    assert_eq!(rd(&mut dev, 0xb0), u32::MAX, "no shared memory region");
}

#[test]
fn odd_accesses_are_ignored() {
    let (_disk, mem, mut dev) = fresh();
    let mut two = [0xffu8; 2];
    dev.read(0x00, &mut two);
    assert_eq!(two, [0, 0], "registers are 32-bit only");
    let mut b = [0xffu8; 4];
    dev.read(0x02, &mut b);
    assert_eq!(b, [0; 4], "misaligned");
    dev.read(0x0a8, &mut b);
    assert_eq!(b, [0; 4], "unknown register");
    let mut empty: [u8; 0] = [];
    dev.read(0x00, &mut empty);
    dev.write(0x70, &[1, 0]);
    assert_eq!(rd(&mut dev, 0x70), 0, "short status write ignored");
    wr(&mut dev, 0x30, 5);
    assert_eq!(rd(&mut dev, 0x34), 0, "no queue 5");
    wr(&mut dev, 0x38, 8);
    wr(&mut dev, 0x44, 1);
    assert_eq!(rd(&mut dev, 0x44), 0);

    let mut vq = handshake(&mut dev, u64::MAX);
    vq.request(&mem, T_FLUSH, 0, None);
    wr(&mut dev, 0x50, 3);
    wr(&mut dev, 0x50, u32::MAX);
    assert_eq!(used_idx(&mem), 0, "notify for a missing queue does nothing");
    notify(&mut dev);
    assert_eq!(used_idx(&mem), 1);
}

#[test]
fn feature_negotiation_rules() {
    let (_disk, _mem, mut dev) = fresh();
    // Driver features before DRIVER are ignored.
    wr(&mut dev, 0x24, 1);
    wr(&mut dev, 0x20, 1);
    wr(&mut dev, 0x70, ACKNOWLEDGE | DRIVER);
    // Without VERSION_1 the device refuses FEATURES_OK.
    wr(&mut dev, 0x24, 0);
    wr(&mut dev, 0x20, 1 << 9);
    wr(&mut dev, 0x70, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert_eq!(rd(&mut dev, 0x70) & FEATURES_OK, 0);
    // A feature the device does not offer is refused too.
    wr(&mut dev, 0x24, 1);
    wr(&mut dev, 0x20, 1 | (1 << 2));
    wr(&mut dev, 0x70, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert_eq!(rd(&mut dev, 0x70) & FEATURES_OK, 0);
    wr(&mut dev, 0x20, 1);
    wr(&mut dev, 0x70, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert_ne!(rd(&mut dev, 0x70) & FEATURES_OK, 0);
    // Frozen after FEATURES_OK; clearing status bits is not allowed either.
    wr(&mut dev, 0x20, 0);
    wr(&mut dev, 0x70, ACKNOWLEDGE);
    assert_eq!(rd(&mut dev, 0x70), ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert_eq!(dev.save().driver_features, (1 << 32) | (1 << 9));
}

#[test]
fn driver_ok_requires_features_ok() {
    let (_disk, mem, mut dev) = fresh();
    wr(&mut dev, 0x70, ACKNOWLEDGE | DRIVER);
    wr(&mut dev, 0x70, ACKNOWLEDGE | DRIVER | DRIVER_OK);
    assert_eq!(rd(&mut dev, 0x70), ACKNOWLEDGE | DRIVER);
    // Queue registers are locked before FEATURES_OK.
    wr(&mut dev, 0x80, 0x5000);
    assert_eq!(dev.save().queues[0].desc_table, 0);
    let mut vq = Vq::default();
    vq.request(&mem, T_FLUSH, 0, None);
    notify(&mut dev);
    assert_eq!(used_idx(&mem), 0, "inactive device does not process");
}

#[test]
fn queue_registers_locked_while_ready() {
    let (_disk, mem, mut dev) = fresh();
    let mut vq = handshake(&mut dev, u64::MAX);
    wr(&mut dev, 0x80, 0x9000);
    wr(&mut dev, 0x38, 4);
    assert_eq!(rd(&mut dev, 0x80), DESC as u32);
    assert_eq!(rd(&mut dev, 0x38), u32::from(QSIZE));
    let head = vq.request(&mem, T_FLUSH, 0, None);
    notify(&mut dev);
    assert_eq!(used_elem(&mem, 0), (u32::from(head), 1));
}

#[test]
fn reset_clears_queues_and_state() {
    let (_disk, mem, mut dev) = fresh();
    let mut vq = handshake(&mut dev, u64::MAX);
    vq.request(&mem, T_FLUSH, 0, None);
    notify(&mut dev);
    assert_eq!(used_idx(&mem), 1);
    assert!(irq_fired(&dev));
    assert_eq!(rd(&mut dev, 0x60), 1);

    wr(&mut dev, 0x70, 0);
    assert_eq!(rd(&mut dev, 0x70), 0);
    assert_eq!(rd(&mut dev, 0x60), 0, "interrupt status cleared");
    assert_eq!(rd(&mut dev, 0x44), 0, "queue not ready");
    assert_eq!(rd(&mut dev, 0x80), 0, "queue address forgotten");
    let s = dev.save();
    assert_eq!(s.driver_features, 0);
    assert_eq!(s.queues[0].next_avail, 0);
    assert!(!s.activated);
    assert_eq!(dev.device().acked_features(), 0);

    // Requests published after the reset are not processed...
    vq.request(&mem, T_FLUSH, 0, None);
    notify(&mut dev);
    assert_eq!(used_idx(&mem), 1);
    assert!(!irq_fired(&dev));
    // ...until the driver sets the device up again from scratch.
    mem.write_slice(&[0u8; 0x1000], GuestAddress(AVAIL))
        .unwrap();
    mem.write_slice(&[0u8; 0x1000], GuestAddress(USED)).unwrap();
    let mut vq = handshake(&mut dev, u64::MAX);
    let head = vq.request(&mem, T_FLUSH, 0, None);
    notify(&mut dev);
    assert_eq!(used_idx(&mem), 1);
    assert_eq!(used_elem(&mem, 0), (u32::from(head), 1));
}

#[test]
fn rings_outside_memory_need_reset() {
    let (_disk, mem, mut dev) = fresh();
    wr(&mut dev, 0x70, ACKNOWLEDGE | DRIVER);
    wr(&mut dev, 0x24, 1);
    wr(&mut dev, 0x20, 1);
    wr(&mut dev, 0x70, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    wr(&mut dev, 0x38, u32::from(QSIZE));
    wr(&mut dev, 0x80, DESC as u32);
    wr(&mut dev, 0x90, AVAIL as u32);
    wr(&mut dev, 0xa0, 0xffff_0000);
    wr(&mut dev, 0xa4, 0x10);
    wr(&mut dev, 0x44, 1);
    wr(
        &mut dev,
        0x70,
        ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
    );
    let mut vq = Vq::default();
    vq.request(&mem, T_FLUSH, 0, None);
    notify(&mut dev);
    assert_ne!(rd(&mut dev, 0x70) & NEEDS_RESET, 0);
    assert_eq!(rd(&mut dev, 0x60), 2, "config-change interrupt");
    assert!(irq_fired(&dev));
    assert_eq!(status_byte(&mem), 0xff, "nothing processed");
    wr(&mut dev, 0x70, 0);
    assert_eq!(rd(&mut dev, 0x70), 0);
}

#[test]
fn misaligned_ring_addresses_are_dropped() {
    let (_disk, _mem, mut dev) = fresh();
    wr(&mut dev, 0x70, ACKNOWLEDGE | DRIVER);
    wr(&mut dev, 0x24, 1);
    wr(&mut dev, 0x20, 1);
    wr(&mut dev, 0x70, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    wr(&mut dev, 0x80, 0x1008);
    wr(&mut dev, 0x38, 3);
    wr(&mut dev, 0x38, 0x1_0010);
    assert_eq!(rd(&mut dev, 0x80), 0);
    assert_eq!(rd(&mut dev, 0x38), 256, "invalid sizes leave the maximum");
}
