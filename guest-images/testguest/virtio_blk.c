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

static const char *init_with(struct vblk *d, uint64_t base, uint32_t features_low);
/* mode=hostile: a used-ring address to give the device instead of ours. */
static uint64_t used_override;

const char *vblk_init(struct vblk *d, uint64_t base)
{
	return init_with(d, base, 0);
}

/* `features_low`: driver feature bits 0-31 on top of VERSION_1 (mode=hostile
 * asks for indirect descriptors to feed the device bad indirect tables). */
static const char *init_with(struct vblk *d, uint64_t base, uint32_t features_low)
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
	wr(d, R_DRIVER_FEATURES, features_low);
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
	if (used_override)
		set_addr(d, R_QUEUE_DEVICE_LOW, (const volatile void *)(uintptr_t)used_override);
	else
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

/*
 * mode=hostile: requests no honest driver sends. Each case starts from a
 * freshly reset device, posts one bad chain and waits, bounded, for the
 * device to either complete it (the status byte says how) or set
 * DEVICE_NEEDS_RESET; `report` gets the case's name and the outcome.
 * The device must never take the VMM down: the last case is an ordinary
 * write and read-back on the same device, which must still work.
 */
#define F_INDIRECT_DESC (1u << 28)
#define DESC_F_INDIRECT 4
#define OUT_OF_RAM 0x7fff00000000ULL /* far above any test guest's RAM */
#define LONG_CHAIN 1024 /* indirect descriptors, 128 times the queue */

static struct virtq_desc table[LONG_CHAIN] __attribute__((aligned(16)));
static uint8_t sector_buf[VBLK_SECTOR] __attribute__((aligned(512)));

/* Status byte (0..0xff), VBLK_TIMEOUT, or VBLK_NEEDS_RESET. */
static int post_and_wait(struct vblk *d, uint16_t head, uint16_t bump)
{
	uint16_t slot = d->avail_idx % QSIZE;
	vq->avail.ring[slot] = head;
	fence();
	d->avail_idx++;
	vq->avail.idx = (uint16_t)(d->avail_idx + bump);
	fence();
	wr(d, R_QUEUE_NOTIFY, 0);
	uint64_t start = *d->clock;
	for (uint64_t spins = 0; vq->used.idx != d->avail_idx; spins++) {
		if ((spins & 255) == 0 && (rd(d, R_STATUS) & S_NEEDS_RESET))
			return VBLK_NEEDS_RESET;
		if (*d->clock - start > d->timeout || spins > SPIN_LIMIT)
			return VBLK_TIMEOUT;
		__asm__ volatile("pause" ::: "memory");
	}
	fence();
	return vq->status;
}

static void hdr_desc(unsigned i, uint32_t type, uint16_t next)
{
	vq->hdr.type = type;
	vq->hdr.reserved = 0;
	vq->hdr.sector = 0;
	vq->status = 0xff;
	set_desc(i, &vq->hdr, sizeof(vq->hdr), DESC_F_NEXT);
	vq->desc[i].next = next;
}

static void raw_desc(unsigned i, uint64_t addr, uint32_t len, uint16_t flags, uint16_t next)
{
	vq->desc[i].addr = addr;
	vq->desc[i].len = len;
	vq->desc[i].flags = flags;
	vq->desc[i].next = next;
}

static void status_desc(unsigned i)
{
	set_desc(i, &vq->status, 1, DESC_F_WRITE);
}

enum hostile_case {
	H_BAD_DATA_ADDR,
	H_BAD_HEADER_ADDR,
	H_BAD_STATUS_ADDR,
	H_HUGE_LEN,
	H_WRAPPING_ADDR,
	H_LOOP,
	H_SELF_LOOP,
	H_NEXT_OUT_OF_RANGE,
	H_INDIRECT_LONG,
	H_INDIRECT_LOOP,
	H_INDIRECT_BAD_LEN,
	H_INDIRECT_NESTED,
	H_INDIRECT_OUT_OF_RAM,
	H_HEAD_OUT_OF_RANGE,
	H_AVAIL_JUMP,
	H_USED_OUT_OF_RAM,
	H_RING_IN_MMIO,
	H_NOTIFY_UNDEFINED,
	H_CASES
};

static const char *const case_names[H_CASES] = {
	"bad-data-addr",      "bad-header-addr",  "bad-status-addr",	"huge-len",
	"wrapping-addr",      "loop",		  "self-loop",		"next-out-of-range",
	"indirect-long",      "indirect-loop",	  "indirect-bad-len",	"indirect-nested",
	"indirect-out-of-ram", "head-out-of-range", "avail-jump",	"used-out-of-ram",
	"ring-in-mmio",	      "notify-undefined",
};

static int hostile_case(struct vblk *d, enum hostile_case c)
{
	uint64_t mmio_page = d->base & ~0xfffULL;
	used_override = c == H_USED_OUT_OF_RAM ? OUT_OF_RAM : c == H_RING_IN_MMIO ? mmio_page : 0;
	const char *err = init_with(d, d->base, F_INDIRECT_DESC);
	used_override = 0;
	if (err)
		return VBLK_INIT_FAILED;
	uint64_t buf = (uint64_t)(uintptr_t)sector_buf;
	uint16_t bump = 0;
	uint16_t head = 0;
	switch (c) {
	case H_BAD_DATA_ADDR:
		hdr_desc(0, VBLK_T_IN, 1);
		raw_desc(1, OUT_OF_RAM, VBLK_SECTOR, DESC_F_NEXT | DESC_F_WRITE, 2);
		status_desc(2);
		break;
	case H_BAD_HEADER_ADDR:
		raw_desc(0, OUT_OF_RAM, 16, DESC_F_NEXT, 1);
		raw_desc(1, buf, VBLK_SECTOR, DESC_F_NEXT | DESC_F_WRITE, 2);
		status_desc(2);
		break;
	case H_BAD_STATUS_ADDR:
		hdr_desc(0, VBLK_T_IN, 1);
		raw_desc(1, buf, VBLK_SECTOR, DESC_F_NEXT | DESC_F_WRITE, 2);
		raw_desc(2, OUT_OF_RAM, 1, DESC_F_WRITE, 0);
		break;
	case H_HUGE_LEN:
		hdr_desc(0, VBLK_T_OUT, 1);
		raw_desc(1, buf, 0xffffffffu, DESC_F_NEXT, 2);
		status_desc(2);
		break;
	case H_WRAPPING_ADDR:
		hdr_desc(0, VBLK_T_IN, 1);
		raw_desc(1, ~0ULL - 255, VBLK_SECTOR, DESC_F_NEXT | DESC_F_WRITE, 2);
		status_desc(2);
		break;
	case H_LOOP:
		hdr_desc(0, VBLK_T_IN, 1);
		raw_desc(1, buf, VBLK_SECTOR, DESC_F_NEXT | DESC_F_WRITE, 2);
		raw_desc(2, (uint64_t)(uintptr_t)&vq->status, 1, DESC_F_NEXT | DESC_F_WRITE, 0);
		break;
	case H_SELF_LOOP:
		hdr_desc(0, VBLK_T_IN, 0);
		break;
	case H_NEXT_OUT_OF_RANGE:
		hdr_desc(0, VBLK_T_IN, 0x5a5a);
		break;
	case H_INDIRECT_LONG:
	case H_INDIRECT_LOOP:
		for (unsigned i = 0; i < LONG_CHAIN; i++) {
			table[i].addr = buf;
			table[i].len = VBLK_SECTOR;
			table[i].flags = DESC_F_NEXT | DESC_F_WRITE;
			table[i].next = (uint16_t)(c == H_INDIRECT_LOOP ? 0 : i + 1);
		}
		table[0].addr = (uint64_t)(uintptr_t)&vq->hdr;
		table[0].len = 16;
		table[0].flags = DESC_F_NEXT;
		table[LONG_CHAIN - 1].addr = (uint64_t)(uintptr_t)&vq->status;
		table[LONG_CHAIN - 1].len = 1;
		table[LONG_CHAIN - 1].flags = DESC_F_WRITE;
		hdr_desc(0, VBLK_T_IN, 0);
		raw_desc(0, (uint64_t)(uintptr_t)table, sizeof(table), DESC_F_INDIRECT, 0);
		break;
	case H_INDIRECT_BAD_LEN:
		hdr_desc(0, VBLK_T_IN, 0);
		raw_desc(0, (uint64_t)(uintptr_t)table, 17, DESC_F_INDIRECT, 0);
		break;
	case H_INDIRECT_NESTED:
		table[0].addr = (uint64_t)(uintptr_t)table;
		table[0].len = sizeof(table);
		table[0].flags = DESC_F_INDIRECT;
		table[0].next = 0;
		hdr_desc(0, VBLK_T_IN, 0);
		raw_desc(0, (uint64_t)(uintptr_t)table, 16, DESC_F_INDIRECT, 0);
		break;
	case H_INDIRECT_OUT_OF_RAM:
		hdr_desc(0, VBLK_T_IN, 0);
		raw_desc(0, OUT_OF_RAM, 64, DESC_F_INDIRECT, 0);
		break;
	case H_HEAD_OUT_OF_RANGE:
		hdr_desc(0, VBLK_T_FLUSH, 1);
		status_desc(1);
		head = 0x5a5a;
		break;
	case H_AVAIL_JUMP:
		hdr_desc(0, VBLK_T_FLUSH, 1);
		status_desc(1);
		bump = 1000;
		break;
	case H_USED_OUT_OF_RAM:
	case H_RING_IN_MMIO:
		hdr_desc(0, VBLK_T_FLUSH, 1);
		status_desc(1);
		break;
	case H_NOTIFY_UNDEFINED:
		/* Kicks of queues that do not exist, then an honest flush. */
		wr(d, R_QUEUE_NOTIFY, 1);
		wr(d, R_QUEUE_NOTIFY, 0xffff);
		wr(d, R_QUEUE_NOTIFY, 0xffffffffu);
		*(volatile uint8_t *)(uintptr_t)(d->base + R_QUEUE_NOTIFY + 1) = 0xff;
		hdr_desc(0, VBLK_T_FLUSH, 1);
		status_desc(1);
		break;
	default:
		return VBLK_INIT_FAILED;
	}
	return post_and_wait(d, head, bump);
}

int vblk_hostile(struct vblk *d, void (*report)(const char *name, int result))
{
	for (int c = 0; c < H_CASES; c++)
		report(case_names[c], hostile_case(d, (enum hostile_case)c));
	/* Whatever the cases did, a reset gives back a working device. */
	const char *err = vblk_init(d, d->base);
	if (err)
		return VBLK_INIT_FAILED;
	for (unsigned i = 0; i < VBLK_SECTOR; i++)
		sector_buf[i] = (uint8_t)(i * 7 + 3);
	int r = vblk_request(d, VBLK_T_OUT, 1, sector_buf, VBLK_SECTOR);
	if (r)
		return r;
	for (unsigned i = 0; i < VBLK_SECTOR; i++)
		sector_buf[i] = 0;
	r = vblk_request(d, VBLK_T_IN, 1, sector_buf, VBLK_SECTOR);
	if (r)
		return r;
	for (unsigned i = 0; i < VBLK_SECTOR; i++)
		if (sector_buf[i] != (uint8_t)(i * 7 + 3))
			return VBLK_BAD_DATA;
	return 0;
}
