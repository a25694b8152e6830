/*
 * rewind test guest: mode=hostile. Everything a broken or malicious guest
 * can throw at rewind's devices, in turn, each step announced on the
 * console: every I/O port, every offset and width of the MMIO devices and
 * of the empty MMIO gap, print doorbells with impossible addresses, bad
 * virtio chains and rings (virtio_blk.c), and a console flood. rewind must
 * survive all of it; the guest says HOSTILE-DONE at the end (tests/hostile.rs).
 */
#include "testguest.h"
#include "virtio_blk.h"

#define DBG_SIZE 0x1000UL
#define GAP_START 0xC0000000UL
#define GAP_PROBE_END 0xFEC00000UL /* the IOAPIC, LAPIC and KVM's pages follow */
#define GAP_STRIDE 0x10000UL

/* Ring 0 reads, then writes `value` to, every port in [lo, hi) at `width` bytes. */
static void port_sweep(uint64_t lo, uint64_t hi, uint64_t width, uint64_t value)
{
	uint64_t code = width == 1 ? 5 : width == 2 ? 6 : 7;
	__asm__ volatile("cli" : "+a"(code) : "b"(lo), "c"(hi), "S"(value) : "memory");
}

static uint64_t mmio_read(uint64_t addr, unsigned width)
{
	switch (width) {
	case 1:
		return *(volatile uint8_t *)addr;
	case 2:
		return *(volatile uint16_t *)addr;
	case 4:
		return *(volatile uint32_t *)addr;
	default:
		return *(volatile uint64_t *)addr;
	}
}

static void mmio_write(uint64_t addr, unsigned width, uint64_t v)
{
	switch (width) {
	case 1:
		*(volatile uint8_t *)addr = (uint8_t)v;
		break;
	case 2:
		*(volatile uint16_t *)addr = (uint16_t)v;
		break;
	case 4:
		*(volatile uint32_t *)addr = (uint32_t)v;
		break;
	default:
		*(volatile uint64_t *)addr = v;
	}
}

/* Every offset of a device page at every width, read and written; `skip`
 * is the one offset whose write ends the VM (the debug console's exit). */
static uint64_t mmio_sweep(uint64_t base, uint64_t size, uint64_t skip)
{
	uint64_t n = 0, sum = 0;
	for (uint64_t off = 0; off < size; off++)
		for (unsigned w = 1; w <= 8; w *= 2) {
			sum += mmio_read(base + off, w);
			if (off != skip)
				mmio_write(base + off, w, 0xA55A5AA5A55A5AA5ULL ^ (off * 0x0101010101010101ULL));
			n += 2;
		}
	(void)sum;
	return n;
}

static void say_count(const char *what, uint64_t n)
{
	struct line l = { .len = 0 };
	put_str(&l, what);
	put_u64(&l, n);
	emit(&l);
}

static void report_virtio(const char *name, int result)
{
	struct line l = { .len = 0 };
	put_str(&l, "hostile virtio ");
	put_str(&l, name);
	put_str(&l, " ");
	if (result == VBLK_TIMEOUT)
		put_str(&l, "timeout");
	else if (result == VBLK_NEEDS_RESET)
		put_str(&l, "needs-reset");
	else {
		put_str(&l, "status ");
		put_u64(&l, (uint64_t)result);
	}
	emit(&l);
}

static char flood_line[4096];

void run_hostile(const uint8_t *zp, uint64_t period_ms, uint64_t flood_mib)
{
	/* As in mode=disk: no PIC interrupt may reach vectors without a gate. */
	mmio_write32(LAPIC_LVT0, LVT0_EXTINT_MASKED);

	/* Ports: all but the PIC, PIT and ELCR (KVM's own) and the exit port.
	 * rewind's devices get every width; 0x5A is no reset, poweroff or exit
	 * command for any of them. */
	static const uint64_t ranges[][2] = { { 0, 0x20 },     { 0x22, 0x40 },	 { 0x44, 0xa0 },
					      { 0xa2, 0xf4 },  { 0xf5, 0x4d0 }, { 0x4d2, 0x10000 } };
	uint64_t ports = 0;
	for (unsigned i = 0; i < sizeof(ranges) / sizeof(ranges[0]); i++) {
		port_sweep(ranges[i][0], ranges[i][1], 1, 0x5A);
		ports += ranges[i][1] - ranges[i][0];
	}
	static const uint64_t devices[][2] = { { 0x60, 0x65 },   { 0x2f8, 0x300 }, { 0x3f8, 0x400 },
					       { 0x600, 0x602 }, { 0x80, 0x90 },   { 0xcf8, 0xd00 } };
	for (unsigned i = 0; i < sizeof(devices) / sizeof(devices[0]); i++) {
		port_sweep(devices[i][0], devices[i][1], 2, 0x5A5A);
		port_sweep(devices[i][0], devices[i][1], 4, 0x5A5A5A5A);
	}
	say("");
	say_count("hostile ports done ", ports);

	/* MMIO: the debug console, the first virtio window, and a probe every
	 * 64 KiB of the rest of the gap, where no device is. */
	uint64_t accesses = mmio_sweep(DBG_BASE, DBG_SIZE, DBG_EXIT - DBG_BASE);
	accesses += mmio_sweep(DISK0_BASE, PAGE, ~0UL);
	for (uint64_t a = GAP_START; a < GAP_PROBE_END; a += GAP_STRIDE) {
		if (a == DBG_BASE)
			continue;
		(void)mmio_read(a, 4);
		mmio_write(a, 4, 0x5A5A5A5A);
		accesses += 2;
	}
	say("");
	say_count("hostile mmio done ", accesses);

	/* The print doorbell with addresses and lengths no line has. */
	uint64_t top = ram_top(zp);
	mmio_write64(DBG_PRINT, 0x7fff00000000ULL | (100UL << 48));
	mmio_write64(DBG_PRINT, (top - 10) | (0xffffUL << 48));
	mmio_write64(DBG_PRINT, 0xffffffffffffffffULL);
	say("");
	say("hostile doorbell done");

	struct vblk d;
	if (vblk_present(DISK0_BASE)) {
		d.clock = &ticks[0];
		d.timeout = 500 / period_ms + 2; /* ~0.5 s of guest time per case */
		/* After the MMIO sweep above, a reset must bring the device back. */
		const char *err = vblk_init(&d, DISK0_BASE);
		int r = err ? VBLK_INIT_FAILED : vblk_hostile(&d, report_virtio);
		if (r == 0)
			say("hostile virtio recovered ok");
		else
			say_count("hostile virtio recovery FAILED ", (uint64_t)r);
	} else {
		say("hostile virtio skipped: no disk");
	}

	/* The console flood: 4 KiB lines, one exit each. */
	for (unsigned i = 0; i < sizeof(flood_line) - 1; i++)
		flood_line[i] = (char)('a' + i % 26);
	memcpy(flood_line, "FLOOD ", 6);
	flood_line[sizeof(flood_line) - 1] = '\n';
	uint64_t lines = flood_mib * (1UL << 20) / sizeof(flood_line);
	for (uint64_t i = 0; i < lines; i++)
		print(flood_line, sizeof(flood_line));
	say_count("hostile flood done ", lines);

	say("HOSTILE-DONE");
}
