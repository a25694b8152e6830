/*
 * rewind test guest: polling virtio-blk driver (see virtio_blk.h).
 *
 * Runs in ring 3 and takes no interrupts: the guest's IDT has no gate for
 * the device's IRQ and never unmasks its IOAPIC pin, so completion is found
 * by polling the used ring. Every request is one MMIO exit (QueueNotify).
 *
 * The VMM reads and writes the rings and buffers behind the compiler's back,
 * so the rings are only touched through a volatile pointer, and a full fence
 * with a "memory" clobber separates filling a request from publishing it.
 */
#include "virtio_blk.h"

/* virtio-mmio registers (virtio 1.1 section 4.2.2), all 32-bit. */
#define R_MAGIC 0x000
#define R_VERSION 0x004
#define R_DEVICE_ID 0x008
#define R_DEVICE_FEATURES 0x010
#define R_DEVICE_FEATURES_SEL 0x014
#define R_DRIVER_FEATURES 0x020
#define R_DRIVER_FEATURES_SEL 0x024
#define R_QUEUE_SEL 0x030
#define R_QUEUE_NUM_MAX 0x034
#define R_QUEUE_NUM 0x038
#define R_QUEUE_READY 0x044
#define R_QUEUE_NOTIFY 0x050
#define R_STATUS 0x070
#define R_QUEUE_DESC_LOW 0x080
#define R_QUEUE_DESC_HIGH 0x084
#define R_QUEUE_DRIVER_LOW 0x090
#define R_QUEUE_DRIVER_HIGH 0x094
#define R_QUEUE_DEVICE_LOW 0x0a0
#define R_QUEUE_DEVICE_HIGH 0x0a4
#define R_CONFIG_GENERATION 0x0fc
#define R_CONFIG 0x100 /* virtio_blk_config; capacity (u64) first */

#define MAGIC 0x74726976 /* "virt" */
#define DEVICE_ID_BLOCK 2

#define S_ACKNOWLEDGE 1
#define S_DRIVER 2
#define S_DRIVER_OK 4
#define S_FEATURES_OK 8
#define S_NEEDS_RESET 0x40
#define S_FAILED 0x80

#define F_VERSION_1_HIGH 1 /* feature bit 32, in the upper feature word */

#define DESC_F_NEXT 1
#define DESC_F_WRITE 2
#define AVAIL_F_NO_INTERRUPT 1

/* One request uses at most 3 descriptors; 8 is the smallest tidy power of two. */
#define QSIZE 8

/* Generous: the timeout clock is what normally ends a wait. This only bounds
 * the spin if the clock stopped too (interrupts lost), so the guest still
 * says DISK-TIMEOUT instead of hanging silently. */
#define SPIN_LIMIT (1ULL << 32)

struct virtq_desc {
	uint64_t addr;
	uint32_t len;
	uint16_t flags;
	uint16_t next;
};

struct virtq_avail {
	uint16_t flags;
	uint16_t idx;
	uint16_t ring[QSIZE];
	uint16_t used_event;
};

struct virtq_used_elem {
	uint32_t id;
	uint32_t len;
};

struct virtq_used {
	uint16_t flags;
	uint16_t idx;
	struct virtq_used_elem ring[QSIZE];
	uint16_t avail_event;
};

struct blk_req_hdr {
	uint32_t type;
	uint32_t reserved;
	uint64_t sector;
};

/* The whole queue plus the request header and status byte in one page.
 * Guest-physical = virtual here (identity mapping), so addresses go to the
 * device as they are. Alignments are the split-ring minimums (2.6). */
struct queue_page {
	struct virtq_desc desc[QSIZE] __attribute__((aligned(16)));
	struct virtq_avail avail __attribute__((aligned(2)));
	struct virtq_used used __attribute__((aligned(4)));
	struct blk_req_hdr hdr __attribute__((aligned(16)));
	uint8_t status;
};

static struct queue_page queue_page __attribute__((aligned(4096)));
static volatile struct queue_page *const vq = &queue_page;

static uint32_t rd(const struct vblk *d, uint32_t off)
{
	return *(volatile uint32_t *)(uintptr_t)(d->base + off);
}

static void wr(const struct vblk *d, uint32_t off, uint32_t v)
{
	*(volatile uint32_t *)(uintptr_t)(d->base + off) = v;
}

/* Orders our ring and buffer stores before what follows (the device may run
 * on another host thread as soon as it sees them), and keeps the compiler
 * from caching or sinking memory accesses across it. */
static void fence(void)
{
	__asm__ volatile("mfence" ::: "memory");
}

int vblk_present(uint64_t base)
{
	/* An address no device claims reads as all ones, so this fails cleanly. */
	struct vblk d = { .base = base };
	return rd(&d, R_MAGIC) == MAGIC && rd(&d, R_VERSION) == 2 &&
	       rd(&d, R_DEVICE_ID) == DEVICE_ID_BLOCK;
}

static void set_addr(const struct vblk *d, uint32_t low_reg, const volatile void *p)
{
	uint64_t a = (uint64_t)(uintptr_t)p;
	wr(d, low_reg, (uint32_t)a);
	wr(d, low_reg + 4, (uint32_t)(a >> 32));
}

static const char *fail(struct vblk *d, const char *why)
{
	/* Tell the device we gave up (3.1.1), then say which step failed. */
	wr(d, R_STATUS, rd(d, R_STATUS) | S_FAILED);
	return why;
}

/* The 64-bit capacity is read as two 32-bit halves; ConfigGeneration tells
 * whether it changed in between (4.2.2.2), in which case read it again. */
static uint64_t read_capacity(const struct vblk *d)
{
	for (;;) {
		uint32_t gen = rd(d, R_CONFIG_GENERATION);
		uint64_t lo = rd(d, R_CONFIG), hi = rd(d, R_CONFIG + 4);
		if (rd(d, R_CONFIG_GENERATION) == gen)
			return lo | hi << 32;
	}
}

const char *vblk_init(struct vblk *d, uint64_t base)
{
	d->base = base;
	d->avail_idx = 0;

	/* Initialisation sequence of 3.1.1, with the MMIO specifics of 4.2.3. */
	wr(d, R_STATUS, 0);
	if (rd(d, R_STATUS) != 0)
		return fail(d, "reset");
	wr(d, R_STATUS, S_ACKNOWLEDGE);
	wr(d, R_STATUS, S_ACKNOWLEDGE | S_DRIVER);

	wr(d, R_DEVICE_FEATURES_SEL, 1);
	uint32_t high = rd(d, R_DEVICE_FEATURES);
	wr(d, R_DEVICE_FEATURES_SEL, 0);
	(void)rd(d, R_DEVICE_FEATURES); /* low word: nothing there we want */
	if (!(high & F_VERSION_1_HIGH))
		return fail(d, "no VIRTIO_F_VERSION_1");
	/* VERSION_1 only: no EVENT_IDX, no indirect descriptors, no SEG_MAX
	 * limits to honour (a request has one data descriptor). */
	wr(d, R_DRIVER_FEATURES_SEL, 0);
	wr(d, R_DRIVER_FEATURES, 0);
	wr(d, R_DRIVER_FEATURES_SEL, 1);
	wr(d, R_DRIVER_FEATURES, F_VERSION_1_HIGH);
	wr(d, R_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
	if (!(rd(d, R_STATUS) & S_FEATURES_OK))
		return fail(d, "features refused");

	wr(d, R_QUEUE_SEL, 0);
	if (rd(d, R_QUEUE_READY) != 0)
		return fail(d, "queue 0 already live");
	if (rd(d, R_QUEUE_NUM_MAX) < QSIZE)
		return fail(d, "queue 0 too small");
	/* The device was just reset, but an earlier boot of this guest (a
	 * reboot, or a revert to before) may have left old entries here. */
	volatile uint64_t *p = (volatile uint64_t *)vq;
	for (unsigned long i = 0; i < sizeof(queue_page) / 8; i++)
		p[i] = 0;
	/* We poll: ask for no interrupts. Only a hint (a device may ignore it,
	 * virtio-queue does), so the caller must make sure none is delivered. */
	vq->avail.flags = AVAIL_F_NO_INTERRUPT;
	fence();
	wr(d, R_QUEUE_NUM, QSIZE);
	set_addr(d, R_QUEUE_DESC_LOW, vq->desc);
	set_addr(d, R_QUEUE_DRIVER_LOW, &vq->avail);
	set_addr(d, R_QUEUE_DEVICE_LOW, &vq->used);
	wr(d, R_QUEUE_READY, 1);
	if (rd(d, R_QUEUE_READY) != 1)
		return fail(d, "queue 0 not ready");

	wr(d, R_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
	uint32_t st = rd(d, R_STATUS);
	if (!(st & S_DRIVER_OK) || (st & S_NEEDS_RESET))
		return fail(d, "DRIVER_OK refused");
	d->capacity = read_capacity(d);
	return 0;
}

static void set_desc(unsigned i, const volatile void *addr, uint32_t len, uint16_t flags)
{
	vq->desc[i].addr = (uint64_t)(uintptr_t)addr;
	vq->desc[i].len = len;
	vq->desc[i].flags = flags;
	vq->desc[i].next = (uint16_t)(i + 1);
}

int vblk_request(struct vblk *d, uint32_t type, uint64_t sector, void *buf, uint32_t len)
{
	/* Always the chain 0 -> 1 (-> 2): with one request in flight, the
	 * previous one's descriptors are free again once it was used. */
	vq->hdr.type = type;
	vq->hdr.reserved = 0;
	vq->hdr.sector = sector;
	vq->status = 0xff; /* so a device that never writes it is caught */
	unsigned n = 0;
	set_desc(n++, &vq->hdr, sizeof(vq->hdr), DESC_F_NEXT);
	if (len) {
		uint16_t w = type == VBLK_T_OUT ? 0 : DESC_F_WRITE;
		set_desc(n++, buf, len, DESC_F_NEXT | w);
	}
	set_desc(n, &vq->status, 1, DESC_F_WRITE);

	uint16_t slot = d->avail_idx % QSIZE;
	vq->avail.ring[slot] = 0;
	/* The descriptors (and the caller's data) must be visible before the
	 * index that publishes them (2.6.13), and the index before the notify. */
	fence();
	d->avail_idx++;
	vq->avail.idx = d->avail_idx;
	fence();
	wr(d, R_QUEUE_NOTIFY, 0);

	/* The device may complete asynchronously (ioeventfd + VMM thread). */
	uint64_t start = d->clock ? *d->clock : 0;
	for (uint64_t spins = 0; vq->used.idx != d->avail_idx; spins++) {
		if (spins > SPIN_LIMIT || (d->clock && *d->clock - start > d->timeout))
			return VBLK_TIMEOUT;
		__asm__ volatile("pause" ::: "memory");
	}
	/* Read the status and the caller's buffer only after seeing used.idx. */
	fence();
	if (vq->used.ring[slot].id != 0)
		return VBLK_BAD_USED;
	return vq->status;
}
