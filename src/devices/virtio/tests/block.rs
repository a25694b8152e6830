use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::super::block::{S_IOERR, S_OK, S_UNSUPP};
use super::*;

const ALL: u64 = u64::MAX;

fn setup() -> (TempDisk, GuestMemory, MmioTransport<Block>, Vq) {
    let disk = TempDisk::new(DISK_SECTORS);
    let mem = new_mem();
    let mut dev = new_dev(&mem, &disk, false);
    let vq = handshake(&mut dev, ALL);
    (disk, mem, dev, vq)
}

/// Submits, notifies through MMIO and returns (status, used len) after
/// checking the used ring and interrupt.
fn run(mem: &GuestMemory, dev: &mut MmioTransport<Block>, vq: &mut Vq, head: u16) -> (u8, u32) {
    let before = used_idx(mem);
    notify(dev);
    assert_eq!(used_idx(mem), before.wrapping_add(1), "one used entry");
    let (id, len) = used_elem(mem, before);
    assert_eq!(id, u32::from(head));
    assert!(irq_fired(dev), "interrupt raised");
    assert_eq!(rd(dev, 0x60) & 1, 1, "InterruptStatus used-buffer bit");
    wr(dev, 0x64, 1);
    assert_eq!(rd(dev, 0x60), 0, "acked");
    let _ = vq;
    (status_byte(mem), len)
}

#[test]
fn out_in_flush_get_id() {
    let (disk, mem, mut dev, mut vq) = setup();
    let pattern: Vec<u8> = (0..1024u32).map(|i| (i * 7 + 3) as u8).collect();
    mem.write_slice(&pattern, GuestAddress(DATA)).unwrap();
    let head = vq.request(&mem, T_OUT, 3, Some((DATA, 1024, 0)));
    assert_eq!(run(&mem, &mut dev, &mut vq, head), (S_OK, 1));
    let on_disk = disk.bytes();
    assert_eq!(&on_disk[3 * 512..5 * 512], &pattern[..]);
    assert!(
        on_disk[5 * 512..6 * 512].iter().all(|&b| b == 5),
        "neighbour untouched"
    );

    let dst = DATA + 0x1000;
    mem.write_slice(&[0xaa; 1536], GuestAddress(dst)).unwrap();
    let head = vq.request(&mem, T_IN, 3, Some((dst, 1536, F_WRITE)));
    assert_eq!(run(&mem, &mut dev, &mut vq, head), (S_OK, 1537));
    let got = guest_bytes(&mem, dst, 1536);
    assert_eq!(&got[..1024], &pattern[..]);
    assert!(got[1024..].iter().all(|&b| b == 5));

    let head = vq.request(&mem, T_FLUSH, 0, None);
    assert_eq!(run(&mem, &mut dev, &mut vq, head), (S_OK, 1));

    let id_at = DATA + 0x3000;
    mem.write_slice(&[0xee; 20], GuestAddress(id_at)).unwrap();
    let head = vq.request(&mem, T_GET_ID, 0, Some((id_at, 20, F_WRITE)));
    assert_eq!(run(&mem, &mut dev, &mut vq, head), (S_OK, 21));
    let name = disk
        .path
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let mut want = [0u8; 20];
    let n = name.len().min(20);
    want[..n].copy_from_slice(&name.as_bytes()[..n]);
    assert_eq!(guest_bytes(&mem, id_at, 20), want);

    let head = vq.request(&mem, 2 /* SCSI_CMD */, 0, None);
    assert_eq!(run(&mem, &mut dev, &mut vq, head).0, S_UNSUPP);
    let head = vq.request(&mem, 0xdead, 0, None);
    assert_eq!(run(&mem, &mut dev, &mut vq, head).0, S_UNSUPP);
}

#[test]
fn framing_agnostic_header_and_data_in_one_descriptor() {
    let (disk, mem, mut dev, mut vq) = setup();
    write_header(&mem, DATA - 16, T_OUT, 1);
    mem.write_slice(&[0x42; 512], GuestAddress(DATA)).unwrap();
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    let head = vq.push(&mem, &[(DATA - 16, 528, 0), (STATUS, 1, F_WRITE)]);
    assert_eq!(run(&mem, &mut dev, &mut vq, head), (S_OK, 1));
    assert!(disk.bytes()[512..1024].iter().all(|&b| b == 0x42));
    // IN data and status in one writable descriptor: status is its last byte.
    write_header(&mem, HDR, T_IN, 1);
    let head = vq.push(&mem, &[(HDR, 16, 0), (DATA + 0x1000, 513, F_WRITE)]);
    notify(&mut dev);
    assert_eq!(used_elem(&mem, 1), (u32::from(head), 513));
    let got = guest_bytes(&mem, DATA + 0x1000, 513);
    assert!(got[..512].iter().all(|&b| b == 0x42));
    assert_eq!(got[512], S_OK);
}

#[test]
fn malformed_chains_get_ioerr() {
    let (disk, mem, mut dev, mut vq) = setup();
    let before = disk.bytes();

    // Data buffer outside guest memory.
    let head = vq.request(&mem, T_IN, 0, Some((0xffff_0000, 512, F_WRITE)));
    assert_eq!(run(&mem, &mut dev, &mut vq, head), (S_IOERR, 1));
    // Straddling the end of guest memory.
    let end = MEM_SIZE as u64 - 256;
    let head = vq.request(&mem, T_IN, 3, Some((end, 512, F_WRITE)));
    assert_eq!(run(&mem, &mut dev, &mut vq, head), (S_IOERR, 1));
    assert_eq!(
        guest_bytes(&mem, end, 256),
        vec![0; 256],
        "nothing half-written"
    );

    // Write-only header.
    write_header(&mem, HDR, T_IN, 0);
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    let head = vq.push(
        &mem,
        &[
            (HDR, 16, F_WRITE),
            (DATA, 512, F_WRITE),
            (STATUS, 1, F_WRITE),
        ],
    );
    assert_eq!(run(&mem, &mut dev, &mut vq, head), (S_IOERR, 1));

    // Header too short.
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    let head = vq.push(&mem, &[(HDR, 8, 0), (STATUS, 1, F_WRITE)]);
    assert_eq!(run(&mem, &mut dev, &mut vq, head), (S_IOERR, 1));

    // Zero-length status: the status lands in the last writable byte,
    // which leaves a data length that is not whole sectors.
    write_header(&mem, HDR, T_IN, 0);
    mem.write_slice(&[0xaa; 512], GuestAddress(DATA)).unwrap();
    let head = vq.push(
        &mem,
        &[(HDR, 16, 0), (DATA, 512, F_WRITE), (STATUS, 0, F_WRITE)],
    );
    notify(&mut dev);
    assert_eq!(used_elem(&mem, used_idx(&mem) - 1), (u32::from(head), 1));
    assert_eq!(guest_bytes(&mem, DATA + 511, 1), [S_IOERR]);
    assert!(guest_bytes(&mem, DATA, 511).iter().all(|&b| b == 0xaa));
    assert!(irq_fired(&dev));

    // No writable byte at all: nowhere to report, but the chain is returned.
    let head = vq.push(&mem, &[(HDR, 16, 0), (STATUS, 0, F_WRITE)]);
    notify(&mut dev);
    assert_eq!(used_elem(&mem, used_idx(&mem) - 1), (u32::from(head), 0));

    // Sector beyond capacity, straddling it, and overflowing u64.
    for (sector, len) in [
        (DISK_SECTORS, 512),
        (DISK_SECTORS - 1, 1024),
        (u64::MAX, 512),
    ] {
        let head = vq.request(&mem, T_IN, sector, Some((DATA, len, F_WRITE)));
        assert_eq!(
            run(&mem, &mut dev, &mut vq, head),
            (S_IOERR, 1),
            "sector {sector}"
        );
        let head = vq.request(&mem, T_OUT, sector, Some((DATA, len, 0)));
        assert_eq!(
            run(&mem, &mut dev, &mut vq, head),
            (S_IOERR, 1),
            "sector {sector}"
        );
    }
    // Partial sector.
    let head = vq.request(&mem, T_OUT, 0, Some((DATA, 100, 0)));
    assert_eq!(run(&mem, &mut dev, &mut vq, head), (S_IOERR, 1));

    // Huge lengths, in and out.
    let head = vq.request(&mem, T_OUT, 0, Some((DATA, 0xffff_fe00, 0)));
    assert_eq!(run(&mem, &mut dev, &mut vq, head), (S_IOERR, 1));
    let head = vq.request(&mem, T_IN, 0, Some((DATA, 0xffff_fe00, F_WRITE)));
    assert_eq!(run(&mem, &mut dev, &mut vq, head), (S_IOERR, 1));
    // Readable descriptor after a writable one.
    write_header(&mem, HDR, T_OUT, 0);
    let head = vq.push(
        &mem,
        &[
            (HDR, 16, 0),
            (DATA, 512, F_WRITE),
            (DATA, 512, 0),
            (STATUS, 1, F_WRITE),
        ],
    );
    assert_eq!(run(&mem, &mut dev, &mut vq, head), (S_IOERR, 1));

    assert_eq!(
        disk.bytes(),
        before,
        "no malformed request reached the disk"
    );
}

/// Posts what `post` builds on a fresh device, kicks it, and checks the
/// device said DEVICE_NEEDS_RESET, completed nothing, touched no disk byte,
/// and works again after a reset.
fn needs_reset_after(what: &str, post: impl FnOnce(&GuestMemory, &mut Vq)) {
    let (disk, mem, mut dev, mut vq) = setup();
    let before = disk.bytes();
    post(&mem, &mut vq);
    notify(&mut dev);
    assert_eq!(used_idx(&mem), 0, "{what}: nothing completed");
    assert_ne!(rd(&mut dev, 0x70) & 0x40, 0, "{what}: DEVICE_NEEDS_RESET");
    assert!(irq_fired(&dev), "{what}: the driver is told");
    notify(&mut dev);
    assert_eq!(used_idx(&mem), 0, "{what}: a broken queue stays stopped");
    assert_eq!(disk.bytes(), before, "{what}: the disk is untouched");
    wr(&mut dev, 0x70, 0);
    let mut vq = handshake(&mut dev, ALL);
    let head = vq.request(&mem, T_FLUSH, 0, None);
    assert_eq!(run(&mem, &mut dev, &mut vq, head), (S_OK, 1), "{what}");
}

#[test]
fn hostile_rings_mark_the_device_broken() {
    needs_reset_after("next outside the queue", |mem, vq| {
        write_header(mem, HDR, T_FLUSH, 0);
        let head = vq.next_desc;
        write_desc(mem, DESC, head, HDR, 16, F_NEXT, 999);
        vq.next_desc += 1;
        vq.publish(mem, head);
    });
    needs_reset_after("head beyond the queue", |mem, vq| {
        vq.publish(mem, QSIZE + 5);
    });
    needs_reset_after("descriptor loop", |mem, vq| {
        let a = vq.next_desc;
        write_header(mem, HDR, T_IN, 0);
        write_desc(mem, DESC, a, HDR, 16, F_NEXT, a + 1);
        write_desc(mem, DESC, a + 1, STATUS, 1, F_WRITE | F_NEXT, a);
        vq.next_desc += 2;
        vq.publish(mem, a);
    });
    needs_reset_after("lengths past 4 GiB", |mem, vq| {
        let head = vq.request(mem, T_OUT, 0, Some((DATA, u32::MAX, 0)));
        let _ = head;
    });
    needs_reset_after("avail index far ahead", |mem, vq| {
        let idx = vq.avail_idx.wrapping_add(QSIZE + 3);
        mem.write_obj(idx, GuestAddress(AVAIL + 2)).unwrap();
    });
    needs_reset_after("nested indirect table", |mem, vq| {
        let table = DATA + 0x8000;
        write_desc(mem, table, 0, table, 16, F_INDIRECT, 0);
        let i = vq.next_desc;
        write_desc(mem, DESC, i, table, 16, F_INDIRECT, 0);
        vq.next_desc += 1;
        vq.publish(mem, i);
    });
    needs_reset_after("indirect table of 17 bytes", |mem, vq| {
        let i = vq.next_desc;
        write_desc(mem, DESC, i, DATA + 0x8000, 17, F_INDIRECT, 0);
        vq.next_desc += 1;
        vq.publish(mem, i);
    });
}

#[test]
fn too_many_segments_is_ioerr() {
    let (_disk, mem, mut dev, mut vq) = setup();
    let table = DATA + 0x8000;
    let n: u16 = 140; // > SEG_MAX + 2
    write_header(&mem, HDR, T_OUT, 0);
    write_desc(&mem, table, 0, HDR, 16, F_NEXT, 1);
    for i in 1..n - 1 {
        write_desc(&mem, table, i, DATA, 0, F_NEXT, i + 1);
    }
    write_desc(&mem, table, n - 1, STATUS, 1, F_WRITE, 0);
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    let head = vq.push(&mem, &[(table, u32::from(n) * 16, F_INDIRECT)]);
    assert_eq!(run(&mem, &mut dev, &mut vq, head), (S_IOERR, 1));
}

#[test]
fn indirect_descriptors() {
    let (_disk, mem, mut dev, mut vq) = setup();
    assert_ne!(device_features(&mut dev) & (1 << 28), 0);
    let table = DATA + 0x8000;
    write_header(&mem, HDR, T_IN, 7);
    write_desc(&mem, table, 0, HDR, 16, F_NEXT, 1);
    write_desc(&mem, table, 1, DATA, 256, F_WRITE | F_NEXT, 2);
    write_desc(&mem, table, 2, DATA + 0x800, 256, F_WRITE | F_NEXT, 3);
    write_desc(&mem, table, 3, STATUS, 1, F_WRITE, 0);
    let head = vq.push(&mem, &[(table, 64, F_INDIRECT)]);
    assert_eq!(run(&mem, &mut dev, &mut vq, head), (S_OK, 513));
    assert!(guest_bytes(&mem, DATA, 256).iter().all(|&b| b == 7));
    assert!(guest_bytes(&mem, DATA + 0x800, 256).iter().all(|&b| b == 7));
}

#[test]
fn read_only_backend() {
    let disk = TempDisk::new(DISK_SECTORS);
    let mem = new_mem();
    let mut dev = new_dev(&mem, &disk, true);
    let features = device_features(&mut dev);
    assert_ne!(features & (1 << 5), 0, "VIRTIO_BLK_F_RO");
    assert_eq!(features & (3 << 13), 0, "no discard/write-zeroes");
    let mut vq = handshake(&mut dev, ALL);
    let head = vq.request(&mem, T_OUT, 0, Some((DATA, 512, 0)));
    assert_eq!(run(&mem, &mut dev, &mut vq, head), (S_IOERR, 1));
    let head = vq.request(&mem, T_IN, 2, Some((DATA, 512, F_WRITE)));
    assert_eq!(run(&mem, &mut dev, &mut vq, head), (S_OK, 513));
    assert!(guest_bytes(&mem, DATA, 512).iter().all(|&b| b == 2));
    assert!(disk.bytes()[..512].iter().all(|&b| b == 0));
}

fn dwz(mem: &GuestMemory, vq: &mut Vq, t: u32, segs: &[(u64, u32, u32)]) -> u16 {
    write_header(mem, HDR, t, 0);
    for (i, &(sector, num, flags)) in segs.iter().enumerate() {
        let at = DATA + i as u64 * 16;
        mem.write_obj(sector, GuestAddress(at)).unwrap();
        mem.write_obj(num, GuestAddress(at + 8)).unwrap();
        mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
    }
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    let len = segs.len() as u32 * 16;
    vq.push(mem, &[(HDR, 16, 0), (DATA, len, 0), (STATUS, 1, F_WRITE)])
}

#[test]
fn discard_and_write_zeroes() {
    let (disk, mem, mut dev, mut vq) = setup();
    assert_eq!(device_features(&mut dev) & (3 << 13), 3 << 13);
    let mut cfg = [0u8; 4];
    dev.read(0x100 + 0x30, &mut cfg);
    assert_eq!(u32::from_le_bytes(cfg), 1 << 18, "max_write_zeroes_sectors");

    let head = dwz(&mem, &mut vq, T_WRITE_ZEROES, &[(4, 2, 0)]);
    assert_eq!(run(&mem, &mut dev, &mut vq, head), (S_OK, 1));
    let bytes = disk.bytes();
    assert!(bytes[4 * 512..6 * 512].iter().all(|&b| b == 0));
    assert!(bytes[6 * 512..7 * 512].iter().all(|&b| b == 6));
    assert!(bytes[3 * 512..4 * 512].iter().all(|&b| b == 3));

    let head = dwz(&mem, &mut vq, T_WRITE_ZEROES, &[(10, 1, 1)]);
    assert_eq!(run(&mem, &mut dev, &mut vq, head), (S_OK, 1));
    assert!(disk.bytes()[10 * 512..11 * 512].iter().all(|&b| b == 0));

    let head = dwz(&mem, &mut vq, T_DISCARD, &[(16, 8, 0), (32, 8, 0)]);
    assert_eq!(run(&mem, &mut dev, &mut vq, head), (S_OK, 1));
    assert_eq!(disk.bytes().len() as u64, DISK_SECTORS * 512, "size kept");
    let head = dwz(&mem, &mut vq, T_DISCARD, &[(0, 0, 0)]);
    assert_eq!(run(&mem, &mut dev, &mut vq, head), (S_OK, 1), "empty range");

    // Unmap flag on discard, unknown flags: UNSUPP. Out of range: IOERR,
    // and the valid first segment was not applied either.
    let head = dwz(&mem, &mut vq, T_DISCARD, &[(0, 1, 1)]);
    assert_eq!(run(&mem, &mut dev, &mut vq, head).0, S_UNSUPP);
    let head = dwz(&mem, &mut vq, T_WRITE_ZEROES, &[(0, 1, 2)]);
    assert_eq!(run(&mem, &mut dev, &mut vq, head).0, S_UNSUPP);
    let head = dwz(&mem, &mut vq, T_DISCARD, &[(0, 1, 0), (DISK_SECTORS, 1, 0)]);
    assert_eq!(run(&mem, &mut dev, &mut vq, head).0, S_IOERR);
    let head = dwz(&mem, &mut vq, T_WRITE_ZEROES, &[(1, 1, 0), (2, 1, 0)]);
    assert_eq!(
        run(&mem, &mut dev, &mut vq, head).0,
        S_IOERR,
        "max_write_zeroes_seg is 1"
    );
    let head = dwz(&mem, &mut vq, T_WRITE_ZEROES, &[(u64::MAX / 2, 4, 0)]);
    assert_eq!(run(&mem, &mut dev, &mut vq, head).0, S_IOERR);
    assert!(disk.bytes()[..3 * 512]
        .iter()
        .enumerate()
        .all(|(i, &b)| b == (i / 512) as u8));
}

#[test]
fn read_request_marks_page_dirty() {
    let (_disk, mem, mut dev, mut vq) = setup();
    let page = 0x8_0000u64;
    let region = mem.find_region(GuestAddress(0)).unwrap();
    assert!(!region.bitmap().dirty_at(page as usize), "clean before");
    assert!(!region.bitmap().dirty_at(page as usize + 0x1000));
    let head = vq.request(&mem, T_IN, 9, Some((page + 0x200, 512, F_WRITE)));
    assert_eq!(run(&mem, &mut dev, &mut vq, head), (S_OK, 513));
    assert!(
        region.bitmap().dirty_at(page as usize),
        "written by the device"
    );
    assert!(
        !region.bitmap().dirty_at(page as usize + 0x1000),
        "neighbour clean"
    );
    assert!(region.bitmap().dirty_at(USED as usize), "used ring page");
}

#[test]
fn ring_wraps_and_batches() {
    let (disk, mem, mut dev, mut vq) = setup();
    // 4 rounds of 5 three-descriptor requests per notify: chains wrap the
    // 16-entry descriptor table and avail/used indices wrap the ring.
    for round in 0..4u64 {
        for k in 0..5u64 {
            let sector = round * 5 + k;
            let hdr = HDR + k * 16;
            let buf = DATA + k * 512;
            write_header(&mem, hdr, T_OUT, sector);
            let fill = (sector as u8).wrapping_mul(3).wrapping_add(100);
            mem.write_slice(&[fill; 512], GuestAddress(buf)).unwrap();
            vq.push(
                &mem,
                &[(hdr, 16, 0), (buf, 512, 0), (STATUS + k, 1, F_WRITE)],
            );
        }
        notify(&mut dev);
        assert!(irq_fired(&dev));
        assert_eq!(used_idx(&mem), ((round + 1) * 5) as u16);
        assert_eq!(guest_bytes(&mem, STATUS, 5), vec![S_OK; 5]);
        mem.write_slice(&[0xff; 5], GuestAddress(STATUS)).unwrap();
    }
    let bytes = disk.bytes();
    for sector in 0..20u64 {
        let want = (sector as u8).wrapping_mul(3).wrapping_add(100);
        assert_eq!(bytes[(sector * 512) as usize], want, "sector {sector}");
    }
}

#[test]
fn ioeventfd_path() {
    let (_disk, mem, mut dev, mut vq) = setup();
    let head = vq.request(&mem, T_FLUSH, 0, None);
    dev.queue_evts()[0].write(1).unwrap();
    dev.process_queue(0);
    assert_eq!(used_elem(&mem, 0), (u32::from(head), 1));
    assert_eq!(status_byte(&mem), S_OK);
    assert!(irq_fired(&dev));
    assert!(dev.queue_evts()[0].read().is_err(), "eventfd drained");
    dev.process_queue(7); // no such queue: ignored
}

#[test]
fn event_idx_suppresses_interrupts() {
    let (_disk, mem, mut dev, mut vq) = setup();
    let used_event = GuestAddress(USED_EVENT);
    vq.request(&mem, T_FLUSH, 0, None);
    mem.write_obj(0u16, used_event).unwrap();
    notify(&mut dev);
    assert!(
        irq_fired(&dev),
        "used_event 0 crossed by the first completion"
    );
    vq.request(&mem, T_FLUSH, 0, None);
    mem.write_obj(0u16, used_event).unwrap();
    notify(&mut dev);
    assert!(
        !irq_fired(&dev),
        "driver asked for no interrupt until used_event"
    );
    assert_eq!(used_idx(&mem), 2);
    vq.request(&mem, T_FLUSH, 0, None);
    mem.write_obj(2u16, used_event).unwrap();
    notify(&mut dev);
    assert!(irq_fired(&dev));
    // The device publishes avail_event so the driver knows when to kick.
    let avail_event: u16 = mem
        .read_obj(GuestAddress(USED + 4 + 8 * u64::from(QSIZE)))
        .unwrap();
    assert_eq!(avail_event, 3);
}

#[test]
fn no_event_idx_interrupts_every_time() {
    let disk = TempDisk::new(DISK_SECTORS);
    let mem = new_mem();
    let mut dev = new_dev(&mem, &disk, false);
    let mut vq = handshake(&mut dev, !(1 << 29));
    for _ in 0..3 {
        vq.request(&mem, T_FLUSH, 0, None);
        notify(&mut dev);
        assert!(irq_fired(&dev));
    }
}
