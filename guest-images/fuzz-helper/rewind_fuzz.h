/*
 * rewind fuzzing doorbells for a Linux user program (static C, header only).
 *
 * The doorbell page (guest-physical 0xD0000000, register map in rewind's
 * README and src/devices/debug_console.rs) is mapped through /dev/mem, so
 * the program runs as root on a kernel with CONFIG_DEVMEM (the MMIO gap is
 * not RAM, so CONFIG_STRICT_DEVMEM allows it). The input and feedback
 * buffers are one locked page each; rewind is told their guest-physical
 * addresses, read from /proc/self/pagemap.
 *
 *   struct rewind_fuzz f;
 *   if (rewind_fuzz_open(&f) != 0) return 1;      // declares the buffers
 *   rewind_fuzz_snapshot(&f);                     // every input starts here
 *   target(f.input->data, f.input->len, f.feedback);
 *   rewind_fuzz_done(&f);                         // or rewind_fuzz_crash(&f, code)
 *
 * Without a fuzzer attached SNAPSHOT, DONE and CRASH do nothing and the
 * program runs on (input length 0).
 */
#ifndef REWIND_FUZZ_H
#define REWIND_FUZZ_H

#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define REWIND_DOORBELL_PHYS 0xD0000000UL
#define REWIND_REG_MAGIC 0x18
#define REWIND_REG_INPUT 0x20
#define REWIND_REG_FEEDBACK 0x28
#define REWIND_REG_SNAPSHOT 0x30
#define REWIND_REG_DONE 0x38
#define REWIND_REG_CRASH 0x40
#define REWIND_PAGE 4096UL

struct rewind_input {
	uint32_t len;
	uint8_t data[REWIND_PAGE - 4];
};

struct rewind_fuzz {
	volatile uint8_t *bell;
	struct rewind_input *input;
	volatile uint8_t *feedback; /* REWIND_PAGE bytes, zero at the snapshot */
};

static inline void rewind_fuzz_write(struct rewind_fuzz *f, unsigned reg, uint64_t v)
{
	__asm__ volatile("" ::: "memory");
	*(volatile uint64_t *)(f->bell + reg) = v;
	__asm__ volatile("" ::: "memory");
}

/* Guest-physical address of a locked, resident page of ours, or 0. */
static inline uint64_t rewind_fuzz_phys(const void *page)
{
	uint64_t entry = 0;
	int fd = open("/proc/self/pagemap", O_RDONLY);
	if (fd < 0)
		return 0;
	off_t off = (off_t)((uintptr_t)page / REWIND_PAGE) * 8;
	ssize_t n = pread(fd, &entry, sizeof(entry), off);
	close(fd);
	/* Bit 63: present; bits 0-54: the frame (zero without CAP_SYS_ADMIN). */
	if (n != (ssize_t)sizeof(entry) || !(entry >> 63) || !(entry & ((1ULL << 55) - 1)))
		return 0;
	return (entry & ((1ULL << 55) - 1)) * REWIND_PAGE;
}

static inline void *rewind_fuzz_page(void)
{
	void *p = mmap(0, REWIND_PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_LOCKED | MAP_POPULATE, -1, 0);
	if (p == MAP_FAILED)
		return 0;
	/* Written once now, so the page and its page-table dirty bits are set before the snapshot. */
	memset(p, 0, REWIND_PAGE);
	return p;
}

/* 0 on success; -1 if the doorbell page or the buffers cannot be set up. */
static inline int rewind_fuzz_open(struct rewind_fuzz *f)
{
	int fd = open("/dev/mem", O_RDWR | O_SYNC);
	if (fd < 0)
		return -1;
	void *bell = mmap(0, REWIND_PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, REWIND_DOORBELL_PHYS);
	close(fd);
	if (bell == MAP_FAILED)
		return -1;
	f->bell = bell;
	if (memcmp((const void *)(f->bell + REWIND_REG_MAGIC), "RWNDDBG1", 8) != 0)
		return -1;
	f->input = rewind_fuzz_page();
	f->feedback = rewind_fuzz_page();
	if (!f->input || !f->feedback)
		return -1;
	uint64_t in = rewind_fuzz_phys(f->input), fb = rewind_fuzz_phys((const void *)f->feedback);
	if (!in || !fb)
		return -1;
	rewind_fuzz_write(f, REWIND_REG_INPUT, in | (REWIND_PAGE << 48));
	rewind_fuzz_write(f, REWIND_REG_FEEDBACK, fb | (REWIND_PAGE << 48));
	return 0;
}

static inline void rewind_fuzz_snapshot(struct rewind_fuzz *f)
{
	rewind_fuzz_write(f, REWIND_REG_SNAPSHOT, 1);
}

static inline void rewind_fuzz_done(struct rewind_fuzz *f)
{
	rewind_fuzz_write(f, REWIND_REG_DONE, 1);
}

static inline void rewind_fuzz_crash(struct rewind_fuzz *f, uint64_t code)
{
	rewind_fuzz_write(f, REWIND_REG_CRASH, code);
}

#endif
