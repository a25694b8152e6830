/*
 * rewind test guest: what main.c shares with the other ring-3 files
 * (virtio_blk.c, hostile.c, fuzz.c).
 */
#ifndef TESTGUEST_H
#define TESTGUEST_H

#include <stdint.h>

#define DBG_BASE 0xD0000000UL
#define DBG_PRINT (DBG_BASE + 0x08)
#define DBG_EXIT (DBG_BASE + 0x10)
#define LAPIC_TIMER_INITIAL (0xFEE00000UL + 0x380)
#define LAPIC_LVT0 (0xFEE00000UL + 0x350)
#define LVT0_EXTINT_MASKED 0x10700 /* delivery mode ExtINT, mask bit 16 */
#define PAGE 4096UL
#define DISK0_BASE 0xD0001000UL /* first virtio-mmio window rewind places */

struct vblk;

extern volatile uint64_t ticks[];

struct line {
	char buf[160];
	unsigned long len;
};

void *memset(void *d, int c, unsigned long n);
void *memcpy(void *d, const void *s, unsigned long n);
void mmio_write64(uint64_t addr, uint64_t v);
void mmio_write32(uint64_t addr, uint32_t v);
/* One MMIO exit: the VMM reads `len` bytes at `s` from guest memory. */
void print(const char *s, unsigned long len);
void put_str(struct line *l, const char *s);
void put_u64(struct line *l, uint64_t v);
/* Ends the line with a newline and prints it. */
void emit(struct line *l);
void say(const char *s);
__attribute__((noreturn)) void guest_exit(uint32_t status);
/* Highest usable RAM address, from the e820 map in the zero page. */
uint64_t ram_top(const uint8_t *zp);
/* One virtio-blk request; a failure ends the run with a line saying why. */
void disk_io(struct vblk *d, uint32_t type, uint64_t sector, void *buf, uint32_t len);

/* mode=hostile (hostile.c); returns after saying HOSTILE-DONE. */
void run_hostile(const uint8_t *zp, uint64_t period_ms, uint64_t flood_mib);

/* mode=fuzz options (fuzz.c). */
struct fuzz_options {
	uint64_t fault, dirty, ptchange, disk, cr3switch, msrchange, lapicchange, ssechange;
};
__attribute__((noreturn)) void run_fuzz(const struct fuzz_options *o);

#endif
