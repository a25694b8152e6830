/*
 * rewind test guest: polling virtio-blk driver over virtio-mmio (version 2,
 * modern only), run from ring 3. One request in flight at a time, one device
 * at a time (the virtqueue lives in a static page).
 */
#ifndef TESTGUEST_VIRTIO_BLK_H
#define TESTGUEST_VIRTIO_BLK_H

#include <stdint.h>

#define VBLK_SECTOR 512
#define VBLK_ID_LEN 20

/* Request types (virtio 1.1 section 5.2.6). */
#define VBLK_T_IN 0
#define VBLK_T_OUT 1
#define VBLK_T_FLUSH 4
#define VBLK_T_GET_ID 8

/* vblk_request results: 0..255 is the device's status byte (0 = OK,
 * 1 = IOERR, 2 = UNSUPP, 0xff = never written); these are the driver's own. */
#define VBLK_TIMEOUT 0x100 /* the used ring did not move in time */
#define VBLK_BAD_USED 0x101 /* the used ring names a descriptor we never posted */
#define VBLK_NEEDS_RESET 0x102 /* the device set DEVICE_NEEDS_RESET (mode=hostile) */
#define VBLK_INIT_FAILED 0x103 /* the device refused to come up again (mode=hostile) */
#define VBLK_BAD_DATA 0x104 /* a sector read back differs from what was written */

struct vblk {
	uint64_t base; /* guest-physical MMIO window */
	uint64_t capacity; /* 512-byte sectors, from config space */
	uint16_t avail_idx; /* requests posted so far (free-running, as the ring's idx) */
	/* Timeout clock: any counter that advances with guest running time (the
	 * timer tick count). Counting it instead of the TSC means a VM paused
	 * for a snapshot, or restored much later, does not time out spuriously. */
	const volatile uint64_t *clock;
	uint64_t timeout; /* how far *clock may move while waiting for one request */
};

/* Whether a virtio-mmio v2 block device answers at `base`. */
int vblk_present(uint64_t base);

/* Resets and brings up the device. NULL on success, else the failed step. */
const char *vblk_init(struct vblk *d, uint64_t base);

/* One synchronous request. `buf`/`len` is the data buffer (none for FLUSH):
 * device-writable for IN and GET_ID, device-readable for OUT. */
int vblk_request(struct vblk *d, uint32_t type, uint64_t sector, void *buf, uint32_t len);

/* mode=hostile: feeds the device one malformed request after another,
 * calling `report` with each case's name and outcome, then checks that an
 * ordinary write and read-back still work (0) or says how they failed. */
int vblk_hostile(struct vblk *d, void (*report)(const char *name, int result));

#endif
