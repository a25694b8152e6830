/*
 * rewind test guest: ring-3 workload. Runs natively even on PVM hosts, where
 * ring-0 code is emulated, so everything that can be done here is done here.
 * It talks to rewind only through the MMIO debug console (see
 * src/devices/debug_console.rs for the register map).
 *
 * Command line (space separated, all optional):
 *   mode=verify|disk|exit|exitport|triple|insn|hostile|fuzz   default verify
 *   region=MIB      verify: per-vCPU data region, default 16 (0: ticks only)
 *   fill=MIB        verify: per-vCPU area written once at boot and checked
 *                   every 4th tick (much memory, little rewritten: what
 *                   incremental snapshots are for), default 0
 *   disk_sectors=N  disk: sectors checked and rewritten per tick, default 256
 *   period_ms=N     LAPIC timer period, default 100
 *   exit_after=N    verify, disk: vCPU 0 exits with `status` once every vCPU
 *                   (disk: vCPU 0, the only one working) did tick N
 *   status=N        exit status for exit, exitport and exit_after
 *   insn=int3|fwait|popcnt|mxcsr   insn: which ring-0 instruction to probe
 *   resumed=1       verify: rewind wakes the guest right after a restore, and
 *                   it prints `resumed` at once (restore timing without
 *                   waiting for the next tick)
 *   say=TEXT        print TEXT (`_` for a space) after REWIND-READY: lets a
 *                   test show that rewind does not act on what any guest says
 *   flood_mib=N     hostile: console flood size, default 100
 *   fault=1         fuzz: the planted bug is a real fault, not the CRASH doorbell
 *   dirty=N         fuzz: pages each input writes (benchmarks), default 0
 *   ptchange=1      fuzz: each input remaps a 2 MiB window in its own page
 *                   tables and checks it sees the snapshot's mapping first
 *   disk=1          fuzz: each input checks that disk 0's first sector holds
 *                   what it held at the snapshot, then overwrites it
 *   cr3switch=1     fuzz: each input switches to a second address space and
 *                   remaps the window there (ptchange's check, not reachable
 *                   from the snapshot's CR3)
 *   msrchange=1     fuzz: each input checks that KERNEL_GS_BASE holds what it
 *                   held at the snapshot, then writes another value (ring 0)
 *   ssechange=1     fuzz: each input checks that XMM7 holds what it held at
 *                   the snapshot, then writes another value (ring 3)
 *   lapicchange=1   fuzz: each input checks that the LAPIC timer's divide
 *                   register holds what it held at the snapshot, then writes
 *                   another value (ring 3, through the LAPIC's MMIO page)
 *
 * mode=hostile (hostile.c, needs a disk) attacks rewind's devices, says
 * HOSTILE-DONE, then ticks as mode=verify. mode=fuzz (fuzz.c) is a target
 * for `rewind fuzz` and the rewind::Vm API.
 */
#include <stdint.h>

#include "testguest.h"
#include "virtio_blk.h"

#define EXIT_PORT 0xF4
#define LOW_RESERVED (16UL << 20) /* image, stacks, page tables live below */

/* Resume interrupts each vCPU got (entry.S, vector 48). */
extern volatile uint64_t resumes[];
/* Ticks each vCPU has verified, so vCPU 0 can end the run once all got there. */
static volatile uint64_t progress[64];

struct e820_entry {
	uint64_t addr, size;
	uint32_t type;
} __attribute__((packed));

void *memset(void *d, int c, unsigned long n)
{
	unsigned char *p = d;
	while (n--)
		*p++ = (unsigned char)c;
	return d;
}

void *memcpy(void *d, const void *s, unsigned long n)
{
	unsigned char *p = d;
	const unsigned char *q = s;
	while (n--)
		*p++ = *q++;
	return d;
}

void mmio_write64(uint64_t addr, uint64_t v)
{
	*(volatile uint64_t *)addr = v;
}

void mmio_write32(uint64_t addr, uint32_t v)
{
	*(volatile uint32_t *)addr = v;
}

/* One MMIO exit per line: the VMM reads the bytes from guest memory. */
void print(const char *s, unsigned long len)
{
	/* The VMM reads the buffer behind the compiler's back: make it real first. */
	__asm__ volatile("" ::: "memory");
	mmio_write64(DBG_PRINT, (uint64_t)(uintptr_t)s | (len << 48));
}

void put_str(struct line *l, const char *s)
{
	while (*s && l->len < sizeof(l->buf) - 1)
		l->buf[l->len++] = *s++;
}

void put_u64(struct line *l, uint64_t v)
{
	char tmp[24];
	int n = 0;
	do {
		tmp[n++] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	while (n && l->len < sizeof(l->buf) - 1)
		l->buf[l->len++] = tmp[--n];
}

void emit(struct line *l)
{
	l->buf[l->len++] = '\n';
	print(l->buf, l->len);
	l->len = 0;
}

void say(const char *s)
{
	struct line l = { .len = 0 };
	put_str(&l, s);
	emit(&l);
}

/* One command-line word, `_` standing for a space. */
static void say_word(const char *w)
{
	struct line l = { .len = 0 };
	for (; *w && *w != ' ' && l.len < sizeof(l.buf) - 1; w++)
		l.buf[l.len++] = *w == '_' ? ' ' : *w;
	emit(&l);
}

__attribute__((noreturn)) void guest_exit(uint32_t status)
{
	mmio_write32(DBG_EXIT, status);
	for (;;)
		__asm__ volatile("hlt");
}

/* `hlt` traps (#GP) to ring 0, which halts until the next interrupt. */
static void wait_for_interrupt(void)
{
	__asm__ volatile("hlt" ::: "memory");
}

static uint64_t parse_u64(const char *s)
{
	uint64_t v = 0;
	while (*s >= '0' && *s <= '9')
		v = v * 10 + (uint64_t)(*s++ - '0');
	return v;
}

static int starts_with(const char *s, const char *prefix)
{
	while (*prefix)
		if (*s++ != *prefix++)
			return 0;
	return 1;
}

struct options {
	const char *mode;
	uint64_t region_mib, fill_mib, period_ms, exit_after, status, disk_sectors, flood_mib;
	struct fuzz_options fuzz;
	const char *insn;
	const char *say;
};

static int word_is(const char *w, const char *name)
{
	while (*name)
		if (*w++ != *name++)
			return 0;
	return *w == ' ' || *w == 0;
}

static void parse_cmdline(const char *c, struct options *o)
{
	while (c && *c) {
		while (*c == ' ')
			c++;
		if (starts_with(c, "mode="))
			o->mode = c + 5;
		else if (starts_with(c, "region="))
			o->region_mib = parse_u64(c + 7);
		else if (starts_with(c, "fill="))
			o->fill_mib = parse_u64(c + 5);
		else if (starts_with(c, "period_ms="))
			o->period_ms = parse_u64(c + 10);
		else if (starts_with(c, "exit_after="))
			o->exit_after = parse_u64(c + 11);
		else if (starts_with(c, "status="))
			o->status = parse_u64(c + 7);
		else if (starts_with(c, "disk_sectors="))
			o->disk_sectors = parse_u64(c + 13);
		else if (starts_with(c, "insn="))
			o->insn = c + 5;
		else if (starts_with(c, "say="))
			o->say = c + 4;
		else if (starts_with(c, "flood_mib="))
			o->flood_mib = parse_u64(c + 10);
		else if (starts_with(c, "fault="))
			o->fuzz.fault = parse_u64(c + 6);
		else if (starts_with(c, "dirty="))
			o->fuzz.dirty = parse_u64(c + 6);
		else if (starts_with(c, "ptchange="))
			o->fuzz.ptchange = parse_u64(c + 9);
		else if (starts_with(c, "disk="))
			o->fuzz.disk = parse_u64(c + 5);
		else if (starts_with(c, "cr3switch="))
			o->fuzz.cr3switch = parse_u64(c + 10);
		else if (starts_with(c, "msrchange="))
			o->fuzz.msrchange = parse_u64(c + 10);
		else if (starts_with(c, "ssechange="))
			o->fuzz.ssechange = parse_u64(c + 10);
		else if (starts_with(c, "lapicchange="))
			o->fuzz.lapicchange = parse_u64(c + 12);
		while (*c && *c != ' ')
			c++;
	}
}

/* Highest usable RAM address from the e820 map in the zero page. */
uint64_t ram_top(const uint8_t *zp)
{
	uint8_t n = zp[0x1E8];
	const struct e820_entry *e = (const void *)(zp + 0x2D0);
	uint64_t top = 0;
	for (int i = 0; i < n && i < 128; i++)
		if (e[i].type == 1 && e[i].addr + e[i].size > top)
			top = e[i].addr + e[i].size;
	return top;
}

/* Three stamps per page catch lost, stale, swapped and zeroed pages alike. */
static uint64_t stamp(uint64_t cpu, uint64_t tick, uint64_t page)
{
	return 0x5245574E44000000ULL ^ (cpu << 56) ^ (tick << 24) ^ page;
}

static void write_pattern(volatile uint64_t *r, uint64_t pages, uint64_t cpu, uint64_t tick)
{
	for (uint64_t p = 0; p < pages; p++) {
		uint64_t v = stamp(cpu, tick, p);
		r[p * 512] = v;
		r[p * 512 + 255] = ~v;
		r[p * 512 + 511] = v + 1;
	}
}

/* Returns the first bad page index, or `pages` when all are right. */
static uint64_t check_pattern(volatile uint64_t *r, uint64_t pages, uint64_t cpu, uint64_t tick)
{
	for (uint64_t p = 0; p < pages; p++) {
		uint64_t v = stamp(cpu, tick, p);
		if (r[p * 512] != v || r[p * 512 + 255] != ~v || r[p * 512 + 511] != v + 1)
			return p;
	}
	return pages;
}

static void tick_line(struct line *l, uint64_t cpu, uint64_t ncpus, uint64_t seq)
{
	if (ncpus > 1) {
		put_str(l, "cpu");
		put_u64(l, cpu);
		put_str(l, " ");
	}
	put_str(l, "tick ");
	put_u64(l, seq);
}

static int all_reached(uint64_t ncpus, uint64_t tick)
{
	for (uint64_t c = 0; c < ncpus && c < 64; c++)
		if (progress[c] < tick)
			return 0;
	return 1;
}

static void run_verify(uint64_t cpu, uint64_t ncpus, const uint8_t *zp, const struct options *o)
{
	uint64_t pages = o->region_mib * (1UL << 20) / PAGE;
	uint64_t fill_pages = o->fill_mib * (1UL << 20) / PAGE;
	uint64_t top = ram_top(zp) & ~(PAGE - 1);
	uint64_t need = (cpu + 1) * pages * PAGE;
	uint64_t fill_need = ncpus * pages * PAGE + (cpu + 1) * fill_pages * PAGE;
	if (fill_need > top || top - fill_need < LOW_RESERVED) {
		say("REGION-TOO-BIG: not enough guest memory for region=MIB and fill=MIB per vCPU");
		guest_exit(3);
	}
	/* Regions sit at the top of RAM so that large guests exercise the memory above the 32-bit gap. */
	volatile uint64_t *region = (volatile uint64_t *)(uintptr_t)(top - need);
	/* The fill areas lie below every vCPU's region; tick number ~0 marks them. */
	volatile uint64_t *fill = (volatile uint64_t *)(uintptr_t)(top - fill_need);
	uint64_t seq = 0, seen = ticks[cpu], woken = resumes[cpu];
	write_pattern(region, pages, cpu, 0);
	write_pattern(fill, fill_pages, cpu, 0xFFFFFF);
	for (;;) {
		while (ticks[cpu] == seen && resumes[cpu] == woken)
			wait_for_interrupt();
		if (resumes[cpu] != woken) {
			struct line l = { .len = 0 };
			woken = resumes[cpu];
			if (ncpus > 1) {
				put_str(&l, "cpu");
				put_u64(&l, cpu);
				put_str(&l, " ");
			}
			put_str(&l, "resumed");
			emit(&l);
			continue;
		}
		seen = ticks[cpu];
		seq++;
		struct line l = { .len = 0 };
		uint64_t bad = check_pattern(region, pages, cpu, seq - 1);
		uint64_t fill_bad = seq % 4 ? fill_pages : check_pattern(fill, fill_pages, cpu, 0xFFFFFF);
		write_pattern(region, pages, cpu, seq);
		tick_line(&l, cpu, ncpus, seq);
		if (bad < pages) {
			put_str(&l, " CORRUPT page ");
			put_u64(&l, bad);
		} else if (fill_bad < fill_pages) {
			put_str(&l, " CORRUPT fill page ");
			put_u64(&l, fill_bad);
		} else {
			put_str(&l, " ok");
		}
		emit(&l);
		progress[cpu] = seq;
		if (cpu == 0 && o->exit_after && all_reached(ncpus, o->exit_after))
			guest_exit((uint32_t)o->status);
	}
}

/*
 * mode=disk: verify's idea applied to a virtio-blk disk. Every tick reads
 * sectors [0, disk_sectors) back, checks the previous tick's pattern, writes
 * this tick's and flushes. The disk and guest memory (which holds the tick
 * number) must move together, so a snapshot, revert or restore that loses
 * or mixes up disk writes shows as CORRUPT on the next tick.
 */
#define DISK_CHUNK 256 /* sectors per request: the whole buffer below */
#define DISK_WORDS (VBLK_SECTOR / 8)
#define DISK_MAGIC 0x4B534944444E5752ULL /* "RWNDDISK", first bytes of sector 0 */

static uint64_t disk_buf[DISK_CHUNK * DISK_WORDS] __attribute__((aligned(4096)));

/* Differs between ticks, sectors and words, so a stale, misplaced or
 * shifted sector is caught wherever the damage is (splitmix64 finaliser). */
static uint64_t disk_word(uint64_t tick, uint64_t sector, uint64_t word)
{
	if (sector == 0 && word == 0)
		return DISK_MAGIC;
	uint64_t x = tick * 0x9E3779B97F4A7C15ULL + sector * DISK_WORDS + word;
	x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
	x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
	return x ^ (x >> 31);
}

static void disk_fill(uint64_t tick, uint64_t first, uint64_t n)
{
	for (uint64_t s = 0; s < n; s++)
		for (uint64_t w = 0; w < DISK_WORDS; w++)
			disk_buf[s * DISK_WORDS + w] = disk_word(tick, first + s, w);
}

/* Index in the buffer of the first sector not holding `tick`'s pattern, or n. */
static uint64_t disk_check(uint64_t tick, uint64_t first, uint64_t n)
{
	for (uint64_t s = 0; s < n; s++)
		for (uint64_t w = 0; w < DISK_WORDS; w++)
			if (disk_buf[s * DISK_WORDS + w] != disk_word(tick, first + s, w))
				return s;
	return n;
}

/* A request that fails ends the run: the disk's contents are unknown after it. */
void disk_io(struct vblk *d, uint32_t type, uint64_t sector, void *buf, uint32_t len)
{
	int r = vblk_request(d, type, sector, buf, len);
	if (r == 0)
		return;
	if (r == VBLK_TIMEOUT) {
		say("DISK-TIMEOUT");
		guest_exit(5);
	}
	struct line l = { .len = 0 };
	put_str(&l, "DISK-IOERR type ");
	put_u64(&l, type);
	put_str(&l, " sector ");
	put_u64(&l, sector);
	put_str(&l, " status ");
	put_u64(&l, (uint64_t)r);
	emit(&l);
	guest_exit(7);
}

/* Checks tick-1's pattern (unless tick is 0: the disk may hold anything)
 * and writes tick's. Returns the first bad sector, or `sectors`. */
static uint64_t disk_pass(struct vblk *d, uint64_t sectors, uint64_t tick)
{
	uint64_t bad = sectors;
	for (uint64_t s = 0; s < sectors; s += DISK_CHUNK) {
		uint64_t n = sectors - s < DISK_CHUNK ? sectors - s : DISK_CHUNK;
		uint32_t len = (uint32_t)(n * VBLK_SECTOR);
		if (tick > 0) {
			/* The buffer still holds the last write, which for a one-chunk
			 * region is exactly what this read must find: poison it so a
			 * read that transfers nothing cannot pass. */
			memset(disk_buf, 0xA5, len);
			disk_io(d, VBLK_T_IN, s, disk_buf, len);
			uint64_t b = disk_check(tick - 1, s, n);
			if (b < n && bad == sectors)
				bad = s + b;
		}
		disk_fill(tick, s, n);
		disk_io(d, VBLK_T_OUT, s, disk_buf, len);
	}
	disk_io(d, VBLK_T_FLUSH, 0, 0, 0);
	return bad;
}

static void say_disk_id(struct vblk *d)
{
	char id[VBLK_ID_LEN];
	memset(id, 0, sizeof(id));
	disk_io(d, VBLK_T_GET_ID, 0, id, sizeof(id));
	struct line l = { .len = 0 };
	put_str(&l, "disk id ");
	/* NUL-padded, and not NUL-terminated when all 20 bytes are used. */
	for (unsigned i = 0; i < sizeof(id) && id[i]; i++)
		l.buf[l.len++] = id[i] >= ' ' && id[i] < 0x7f ? id[i] : '?';
	emit(&l);
}

static __attribute__((noreturn)) void run_disk(const struct options *o)
{
	/* Nothing tells the guest about devices: look where rewind puts disk 0. */
	if (!vblk_present(DISK0_BASE)) {
		say("NO-DISK");
		guest_exit(4);
	}
	/* rewind wires LINT0 to the PIC (ExtINT) as a BIOS would, and the
	 * never-initialised PIC turns the disk's IRQ 5 into vector 5, which has
	 * no IDT gate: the guest would triple-fault on the first completion.
	 * The driver polls, so mask LINT0 (the LAPIC is reachable from ring 3);
	 * the IOAPIC pins are still masked from reset. */
	mmio_write32(LAPIC_LVT0, LVT0_EXTINT_MASKED);
	struct vblk d;
	const char *err = vblk_init(&d, DISK0_BASE);
	if (err) {
		struct line l = { .len = 0 };
		put_str(&l, "DISK-INIT-FAILED: ");
		put_str(&l, err);
		emit(&l);
		guest_exit(7);
	}
	/* Timer ticks as the timeout clock: about 10 s of guest running time. */
	d.clock = &ticks[0];
	d.timeout = 10000 / o->period_ms + 2;
	say_disk_id(&d);
	uint64_t sectors = o->disk_sectors;
	if (d.capacity < sectors) {
		struct line l = { .len = 0 };
		put_str(&l, "DISK-TOO-SMALL: capacity ");
		put_u64(&l, d.capacity);
		put_str(&l, " sectors, disk_sectors=");
		put_u64(&l, sectors);
		emit(&l);
		guest_exit(6);
	}
	disk_pass(&d, sectors, 0);
	say("REWIND-READY");
	uint64_t seq = 0, seen = ticks[0];
	for (;;) {
		while (ticks[0] == seen)
			wait_for_interrupt();
		seen = ticks[0];
		seq++;
		uint64_t bad = disk_pass(&d, sectors, seq);
		struct line l = { .len = 0 };
		put_str(&l, "tick ");
		put_u64(&l, seq);
		if (bad < sectors) {
			put_str(&l, " disk CORRUPT sector ");
			put_u64(&l, bad);
		} else {
			put_str(&l, " disk ok");
		}
		emit(&l);
		if (o->exit_after && seq >= o->exit_after)
			guest_exit((uint32_t)o->status);
	}
}

static void probe_insn(const char *name)
{
	uint64_t code = word_is(name, "int3")	  ? 1 :
			word_is(name, "fwait")	  ? 2 :
			word_is(name, "popcnt")	  ? 3 :
			word_is(name, "mxcsr") ? 4 :
						   0;
	if (!code) {
		say("unknown insn= value");
		guest_exit(2);
	}
	/* `cli` traps to ring 0, which runs the probed instruction there.
	 * For mxcsr, ring 0 loads rbx into MXCSR and returns what it reads back. */
	uint64_t result = code;
	const uint32_t want = 0x9f80; /* default | flush-to-zero */
	__asm__ volatile("cli" : "+a"(result) : "b"((uint64_t)want) : "memory");
	struct line l = { .len = 0 };
	put_str(&l, "insn ");
	put_u64(&l, code);
	put_str(&l, " done");
	if (code == 4) {
		uint32_t native = 0;
		/* Read MXCSR natively in ring 3: proves the state really changed. */
		__asm__ volatile("stmxcsr %0" : "=m"(native));
		put_str(&l, " mxcsr ");
		put_u64(&l, result & 0xffffffff);
		put_str(&l, " ring3 ");
		put_u64(&l, native);
	}
	emit(&l);
}

void __attribute__((noreturn)) user_main(uint64_t cpu, const uint8_t *zp, uint64_t ncpus)
{
	const char *cmdline = (const char *)(uintptr_t)(*(const uint32_t *)(zp + 0x228));
	struct options o = {
		.mode = "verify", .region_mib = 16, .period_ms = 100, .disk_sectors = 256, .insn = "",
		.say = "", .flood_mib = 100
	};
	parse_cmdline(cmdline, &o);
	if (o.period_ms == 0 || o.period_ms > 4000)
		o.period_ms = 100;
	/* KVM's LAPIC timer counts at 1 GHz; divide-by-1 was set in ring 0. */
	mmio_write32(LAPIC_TIMER_INITIAL, (uint32_t)(o.period_ms * 1000000UL));

	/* disk says it itself, once the disk holds tick 0's pattern. */
	if (cpu == 0 && !word_is(o.mode, "disk"))
		say("REWIND-READY");
	if (cpu == 0 && *o.say)
		say_word(o.say);
	if (word_is(o.mode, "verify"))
		run_verify(cpu, ncpus, zp, &o);
	if (cpu != 0)
		for (;;)
			wait_for_interrupt();
	if (word_is(o.mode, "disk"))
		run_disk(&o);
	if (word_is(o.mode, "hostile")) {
		run_hostile(zp, o.period_ms, o.flood_mib);
		/* Ticks as mode=verify, so a test can snapshot and restore a
		 * guest that did all that. */
		run_verify(0, ncpus, zp, &o);
	}
	if (word_is(o.mode, "exit"))
		guest_exit((uint32_t)o.status);
	if (word_is(o.mode, "exitport")) {
		__asm__ volatile("out %%al, %%dx" : : "a"((uint8_t)o.status), "d"((uint16_t)EXIT_PORT));
		say("exit port write returned");
		guest_exit(1);
	}
	if (word_is(o.mode, "triple"))
		__asm__ volatile("ud2");
	if (word_is(o.mode, "insn")) {
		probe_insn(o.insn);
		guest_exit(0);
	}
	if (word_is(o.mode, "fuzz"))
		run_fuzz(&o.fuzz);
	say("unknown mode= value");
	guest_exit(2);
}
