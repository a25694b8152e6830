/*
 * rewind test guest: mode=fuzz (ring 3), a fuzz target behind the doorbells.
 * Options come from main.c's command line parsing (see its header).
 */
#include <stdint.h>

#include "testguest.h"
#include "virtio_blk.h"

/*
 * mode=fuzz: a ring-3 fuzz target behind the doorbells (register map in
 * src/devices/debug_console.rs). It declares its input and feedback
 * buffers, rings SNAPSHOT, and from there on every run sees a new input,
 * parses it and rings DONE; the planted bug (input starting with "RWND")
 * rings CRASH, or with fault=1 stores to an unmapped address. One compare
 * per byte, each marking the feedback buffer, so a mutator guided by the
 * feedback finds the magic a byte at a time.
 */
#define DBG_FUZZ_INPUT (DBG_BASE + 0x20)
#define DBG_FUZZ_FEEDBACK (DBG_BASE + 0x28)
#define DBG_FUZZ_SNAPSHOT (DBG_BASE + 0x30)
#define DBG_FUZZ_DONE (DBG_BASE + 0x38)
#define DBG_FUZZ_CRASH (DBG_BASE + 0x40)
#define FUZZ_CRASH_CODE 0x444E5752ULL /* "RWND" */
#define FUZZ_STALE_PT_CODE 0x57A1EULL /* the window showed a page-table mapping the reset undid */
#define FUZZ_STALE_DISK_CODE 0xD15CULL /* sector 0 held an earlier input's write */
#define FUZZ_DISK_BEFORE 0xA1 /* sector 0's bytes at the snapshot */
#define FUZZ_STALE_MSR_CODE 0x5157ULL /* KERNEL_GS_BASE held an earlier input's value */
#define FUZZ_MSR_BEFORE 0x5EEDULL /* KERNEL_GS_BASE at the snapshot */
#define FUZZ_STALE_LAPIC_CODE 0x1A71CULL /* the LAPIC held an earlier input's write */
#define FUZZ_STALE_SSE_CODE 0x55EULL /* XMM7 held an earlier input's value */
#define FUZZ_SSE_BEFORE 0x0123456789ABCDEFULL /* XMM7's low half at the snapshot */
#define LAPIC_TIMER_DIVIDE (0xFEE00000UL + 0x3E0)
#define LAPIC_DIVIDE_BEFORE 0xB /* divide by 1, set by entry.S before the snapshot */
#define FUZZ_DIRTY_BASE (40UL << 20) /* dirty=N pages from here (guest needs 64 MiB) */
/* ptchange=1: PD entry 500 (virtual 1000 MiB, no RAM there) maps one of
 * two 2 MiB pages, each holding its own marker. */
#define PT_PD 0xB000UL /* the boot identity map's first PD (src/arch/layout.rs PD_FIRST) */
#define PT_WINDOW_INDEX 500UL
#define PT_WINDOW (PT_WINDOW_INDEX << 21)
#define PT_PAGE_A (32UL << 20)
#define PT_PAGE_B (34UL << 20)
#define PDE_2M_USER_RW 0x87UL

static struct {
	uint32_t len;
	uint8_t data[4092];
} fuzz_input __attribute__((aligned(4096)));
static volatile uint8_t fuzz_feedback[64] __attribute__((aligned(64)));

/* Ring 0 reloads CR3 (the `cli` probe, code 8): the TLB forgets the window. */
static void flush_tlb(void)
{
	uint64_t code = 8;
	__asm__ volatile("cli" : "+a"(code) : : "memory");
}

static void set_window_in(uint64_t pd, uint64_t phys)
{
	*(volatile uint64_t *)(pd + PT_WINDOW_INDEX * 8) = phys | PDE_2M_USER_RW;
	flush_tlb();
}

static void set_window(uint64_t phys)
{
	set_window_in(PT_PD, phys);
}

static uint8_t fuzz_sector[VBLK_SECTOR] __attribute__((aligned(512)));

/* disk=1: sector 0 must read back as FUZZ_DISK_BEFORE in every input. */
static void fuzz_disk_input(struct vblk *d, uint32_t n)
{
	memset(fuzz_sector, 0, sizeof(fuzz_sector));
	disk_io(d, VBLK_T_IN, 0, fuzz_sector, sizeof(fuzz_sector));
	for (unsigned i = 0; i < sizeof(fuzz_sector); i++)
		if (fuzz_sector[i] != FUZZ_DISK_BEFORE)
			mmio_write64(DBG_FUZZ_CRASH, FUZZ_STALE_DISK_CODE);
	memset(fuzz_sector, 0xB0 ^ (int)n, sizeof(fuzz_sector));
	disk_io(d, VBLK_T_OUT, 0, fuzz_sector, sizeof(fuzz_sector));
	disk_io(d, VBLK_T_FLUSH, 0, 0, 0);
}

/* cr3switch=1: a second address space, a copy of the boot tables whose
 * first GiB goes through its own PD (PML4', PDPT', PD' in three pages). */
#define ALT_PML4 (36UL << 20)
#define ALT_PDPT (ALT_PML4 + PAGE)
#define ALT_PD (ALT_PML4 + 2 * PAGE)
#define BOOT_PML4 0x9000UL /* src/arch/layout.rs PML4 */

static void switch_cr3(uint64_t cr3)
{
	uint64_t code = 9;
	__asm__ volatile("cli" : "+a"(code) : "b"(cr3) : "memory");
}

static void build_alt_tables(void)
{
	volatile uint64_t *pml4 = (volatile uint64_t *)ALT_PML4;
	volatile uint64_t *pdpt = (volatile uint64_t *)ALT_PDPT;
	volatile uint64_t *pd = (volatile uint64_t *)ALT_PD;
	const volatile uint64_t *boot_pml4 = (const volatile uint64_t *)BOOT_PML4;
	const volatile uint64_t *boot_pdpt = (const volatile uint64_t *)(boot_pml4[0] & ~0xFFFUL);
	const volatile uint64_t *boot_pd = (const volatile uint64_t *)PT_PD;
	for (int i = 0; i < 512; i++) {
		pml4[i] = boot_pml4[i];
		pdpt[i] = boot_pdpt[i];
		pd[i] = boot_pd[i];
	}
	pdpt[0] = ALT_PD | 7;
	pml4[0] = ALT_PDPT | 7;
}

/* Ring 0 swaps KERNEL_GS_BASE (the `cli` probe, code 10): returns the old
 * value. An MSR only ring-0 code can write. */
static uint64_t swap_kernel_gs_base(uint64_t v)
{
	uint64_t code = 10;
	__asm__ volatile("cli" : "+a"(code) : "b"(v) : "memory");
	return code;
}

/* The compiler uses no vector registers here (-mgeneral-regs-only), so
 * XMM7 holds only what these put there. */
static uint64_t get_xmm7(void)
{
	uint64_t v;
	__asm__ volatile("movq %%xmm7, %0" : "=r"(v));
	return v;
}

static void set_xmm7(uint64_t v)
{
	__asm__ volatile("movq %0, %%xmm7" : : "r"(v));
}

static uint64_t window_marker(void)
{
	return *(volatile uint64_t *)PT_WINDOW;
}

static void fuzz_target(const uint8_t *d, uint32_t n, const struct fuzz_options *o)
{
	fuzz_feedback[0] = 1;
	if (n < 4 || d[0] != 'R')
		return;
	fuzz_feedback[1] = 1;
	if (d[1] != 'W')
		return;
	fuzz_feedback[2] = 1;
	if (d[2] != 'N')
		return;
	fuzz_feedback[3] = 1;
	if (d[3] != 'D')
		return;
	fuzz_feedback[4] = 1;
	if (o->fault)
		*(volatile uint64_t *)0xDEAD00000000UL = 1; /* no page table maps it */
	mmio_write64(DBG_FUZZ_CRASH, FUZZ_CRASH_CODE);
}

__attribute__((noreturn)) void run_fuzz(const struct fuzz_options *o)
{
	/* No timer: an input runs undisturbed and leaves no LAPIC state behind. */
	mmio_write32(LAPIC_TIMER_INITIAL, 0);
	struct vblk disk;
	if (o->disk) {
		/* The driver polls; see run_disk for why LINT0 is masked. */
		mmio_write32(LAPIC_LVT0, LVT0_EXTINT_MASKED);
		if (!vblk_present(DISK0_BASE) || vblk_init(&disk, DISK0_BASE)) {
			say("NO-DISK");
			guest_exit(4);
		}
		/* No timer ticks, so no timeout: rewind's own catches a hang. */
		disk.clock = &ticks[0];
		disk.timeout = ~0ULL;
		memset(fuzz_sector, FUZZ_DISK_BEFORE, sizeof(fuzz_sector));
		disk_io(&disk, VBLK_T_OUT, 0, fuzz_sector, sizeof(fuzz_sector));
		disk_io(&disk, VBLK_T_FLUSH, 0, 0, 0);
	}
	if (o->ptchange) {
		*(volatile uint64_t *)PT_PAGE_A = 0xAAAA;
		*(volatile uint64_t *)PT_PAGE_B = 0xBBBB;
		set_window(PT_PAGE_A);
		(void)window_marker(); /* let KVM shadow the window's mapping */
	}
	if (o->cr3switch) {
		*(volatile uint64_t *)PT_PAGE_A = 0xAAAA;
		*(volatile uint64_t *)PT_PAGE_B = 0xBBBB;
		build_alt_tables();
		set_window_in(ALT_PD, PT_PAGE_A);
		switch_cr3(ALT_PML4);
		(void)window_marker(); /* KVM shadows the second address space too */
		switch_cr3(BOOT_PML4);
	}
	if (o->msrchange)
		(void)swap_kernel_gs_base(FUZZ_MSR_BEFORE);
	if (o->ssechange)
		set_xmm7(FUZZ_SSE_BEFORE);
	/* Write every page an input will write once now: the CPU sets the
	 * dirty bit in the page tables here, before the snapshot, instead of
	 * in every input (a page-table page restored on every reset would make
	 * rewind flush KVM's shadow page tables on PVM each time). */
	*(volatile uint32_t *)&fuzz_input.len = 0;
	fuzz_feedback[0] = 0;
	for (uint64_t p = 0; p < o->dirty; p++)
		*(volatile uint64_t *)(FUZZ_DIRTY_BASE + p * PAGE) = 0;
	mmio_write64(DBG_FUZZ_INPUT, (uint64_t)(uintptr_t)&fuzz_input | (sizeof(fuzz_input) << 48));
	mmio_write64(DBG_FUZZ_FEEDBACK,
		     (uint64_t)(uintptr_t)fuzz_feedback | (sizeof(fuzz_feedback) << 48));
	mmio_write64(DBG_FUZZ_SNAPSHOT, 1);
	/* Every reset comes back here, the next input in fuzz_input (written
	 * behind the compiler's back). */
	__asm__ volatile("" ::: "memory");
	uint32_t n = fuzz_input.len;
	if (n > sizeof(fuzz_input.data))
		n = sizeof(fuzz_input.data);
	if (o->cr3switch) {
		/* Left in place at DONE: the reset finds CR3 moved. */
		switch_cr3(ALT_PML4);
		if (window_marker() != 0xAAAA)
			mmio_write64(DBG_FUZZ_CRASH, FUZZ_STALE_PT_CODE);
		set_window_in(ALT_PD, PT_PAGE_B);
		if (window_marker() != 0xBBBB)
			mmio_write64(DBG_FUZZ_CRASH, FUZZ_STALE_PT_CODE);
	}
	if (o->ptchange) {
		if (window_marker() != 0xAAAA)
			mmio_write64(DBG_FUZZ_CRASH, FUZZ_STALE_PT_CODE);
		set_window(PT_PAGE_B);
		if (window_marker() != 0xBBBB)
			mmio_write64(DBG_FUZZ_CRASH, FUZZ_STALE_PT_CODE);
	}
	for (uint64_t p = 0; p < o->dirty; p++)
		*(volatile uint64_t *)(FUZZ_DIRTY_BASE + p * PAGE) = p + n;
	if (o->msrchange && swap_kernel_gs_base(0x1000 + n) != FUZZ_MSR_BEFORE)
		mmio_write64(DBG_FUZZ_CRASH, FUZZ_STALE_MSR_CODE);
	if (o->ssechange) {
		if (get_xmm7() != FUZZ_SSE_BEFORE)
			mmio_write64(DBG_FUZZ_CRASH, FUZZ_STALE_SSE_CODE);
		set_xmm7(0x1000 + n);
	}
	if (o->lapicchange) {
		/* The timer is stopped, so its divider only has to come back. */
		if (*(volatile uint32_t *)LAPIC_TIMER_DIVIDE != LAPIC_DIVIDE_BEFORE)
			mmio_write64(DBG_FUZZ_CRASH, FUZZ_STALE_LAPIC_CODE);
		mmio_write32(LAPIC_TIMER_DIVIDE, n & 1 ? 0x0 : 0x1);
	}
	if (o->disk)
		fuzz_disk_input(&disk, n);
	fuzz_target(fuzz_input.data, n, o);
	mmio_write64(DBG_FUZZ_DONE, 1);
	say("fuzz: no fuzzer attached, the input ran once");
	guest_exit(0);
}

