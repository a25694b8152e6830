/*
 * rewind test guest: what main.c shares with the other ring-3 files.
 */
#ifndef TESTGUEST_GUEST_H
#define TESTGUEST_GUEST_H

#include <stdint.h>

#define DBG_BASE 0xD0000000UL
#define LAPIC_TIMER_INITIAL (0xFEE00000UL + 0x380)
#define LAPIC_LVT0 (0xFEE00000UL + 0x350)
#define LVT0_EXTINT_MASKED 0x10700 /* delivery mode ExtINT, mask bit 16 */
#define PAGE 4096UL
#define DISK0_BASE 0xD0001000UL /* first virtio-mmio window rewind places */

struct vblk;

extern volatile uint64_t ticks[];

void *memset(void *d, int c, unsigned long n);
void mmio_write64(uint64_t addr, uint64_t v);
void mmio_write32(uint64_t addr, uint32_t v);
void say(const char *s);
__attribute__((noreturn)) void guest_exit(uint32_t status);
/* One virtio-blk request; a failure ends the run with a line saying why. */
void disk_io(struct vblk *d, uint32_t type, uint64_t sector, void *buf, uint32_t len);

/* mode=fuzz options (fuzz.c). */
struct fuzz_options {
	uint64_t fault, dirty, ptchange, disk, cr3switch;
};
__attribute__((noreturn)) void run_fuzz(const struct fuzz_options *o);

#endif
