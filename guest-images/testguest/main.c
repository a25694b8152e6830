/*
 * rewind test guest: ring-3 workload. Runs natively even on PVM hosts, where
 * ring-0 code is emulated, so everything that can be done here is done here.
 * It talks to rewind only through the MMIO debug console (see
 * src/devices/debug_console.rs for the register map).
 *
 * Command line (space separated, all optional):
 *   mode=verify|exit|exitport|triple|insn   default verify
 *   region=MIB      verify: per-vCPU data region, default 16 (0: ticks only)
 *   period_ms=N     LAPIC timer period, default 100
 *   exit_after=N    verify: vCPU 0 exits with `status` once every vCPU did tick N
 *   status=N        exit status for exit, exitport and exit_after
 *   insn=int3|fwait|popcnt|mxcsr   insn: which ring-0 instruction to probe
 */
#include <stdint.h>

#define DBG_BASE 0xD0000000UL
#define DBG_PRINT (DBG_BASE + 0x08)
#define DBG_EXIT (DBG_BASE + 0x10)
#define LAPIC_TIMER_INITIAL (0xFEE00000UL + 0x380)
#define EXIT_PORT 0xF4
#define PAGE 4096UL
#define LOW_RESERVED (16UL << 20) /* image, stacks, page tables live below */

extern volatile uint64_t ticks[];
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

static void mmio_write64(uint64_t addr, uint64_t v)
{
	*(volatile uint64_t *)addr = v;
}

static void mmio_write32(uint64_t addr, uint32_t v)
{
	*(volatile uint32_t *)addr = v;
}

/* One MMIO exit per line: the VMM reads the bytes from guest memory. */
static void print(const char *s, unsigned long len)
{
	/* The VMM reads the buffer behind the compiler's back: make it real first. */
	__asm__ volatile("" ::: "memory");
	mmio_write64(DBG_PRINT, (uint64_t)(uintptr_t)s | (len << 48));
}

struct line {
	char buf[160];
	unsigned long len;
};

static void put_str(struct line *l, const char *s)
{
	while (*s && l->len < sizeof(l->buf) - 1)
		l->buf[l->len++] = *s++;
}

static void put_u64(struct line *l, uint64_t v)
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

static void emit(struct line *l)
{
	l->buf[l->len++] = '\n';
	print(l->buf, l->len);
	l->len = 0;
}

static void say(const char *s)
{
	struct line l = { .len = 0 };
	put_str(&l, s);
	emit(&l);
}

static __attribute__((noreturn)) void guest_exit(uint32_t status)
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
	uint64_t region_mib, period_ms, exit_after, status;
	const char *insn;
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
		else if (starts_with(c, "period_ms="))
			o->period_ms = parse_u64(c + 10);
		else if (starts_with(c, "exit_after="))
			o->exit_after = parse_u64(c + 11);
		else if (starts_with(c, "status="))
			o->status = parse_u64(c + 7);
		else if (starts_with(c, "insn="))
			o->insn = c + 5;
		while (*c && *c != ' ')
			c++;
	}
}

/* Highest usable RAM address from the e820 map in the zero page. */
static uint64_t ram_top(const uint8_t *zp)
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
	uint64_t top = ram_top(zp) & ~(PAGE - 1);
	uint64_t need = (cpu + 1) * pages * PAGE;
	if (need > top || top - need < LOW_RESERVED) {
		say("REGION-TOO-BIG: not enough guest memory for region=MIB per vCPU");
		guest_exit(3);
	}
	/* Regions sit at the top of RAM so that large guests exercise the memory above the 32-bit gap. */
	volatile uint64_t *region = (volatile uint64_t *)(uintptr_t)(top - need);
	uint64_t seq = 0, seen = ticks[cpu];
	write_pattern(region, pages, cpu, 0);
	for (;;) {
		while (ticks[cpu] == seen)
			wait_for_interrupt();
		seen = ticks[cpu];
		seq++;
		struct line l = { .len = 0 };
		uint64_t bad = check_pattern(region, pages, cpu, seq - 1);
		write_pattern(region, pages, cpu, seq);
		tick_line(&l, cpu, ncpus, seq);
		if (bad < pages) {
			put_str(&l, " CORRUPT page ");
			put_u64(&l, bad);
		} else {
			put_str(&l, " ok");
		}
		emit(&l);
		progress[cpu] = seq;
		if (cpu == 0 && o->exit_after && all_reached(ncpus, o->exit_after))
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
	struct options o = { .mode = "verify", .region_mib = 16, .period_ms = 100, .insn = "" };
	parse_cmdline(cmdline, &o);
	if (o.period_ms == 0 || o.period_ms > 4000)
		o.period_ms = 100;
	/* KVM's LAPIC timer counts at 1 GHz; divide-by-1 was set in ring 0. */
	mmio_write32(LAPIC_TIMER_INITIAL, (uint32_t)(o.period_ms * 1000000UL));

	if (cpu == 0)
		say("REWIND-READY");
	if (word_is(o.mode, "verify"))
		run_verify(cpu, ncpus, zp, &o);
	if (cpu != 0)
		for (;;)
			wait_for_interrupt();
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
	say("unknown mode= value");
	guest_exit(2);
}
