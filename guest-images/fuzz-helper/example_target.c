/*
 * A Linux fuzz target using rewind_fuzz.h: the same planted bug as the test
 * guest's mode=fuzz (input starting with "RWND" crashes). Build it static
 * and put it in the guest (initramfs or disk):
 *   gcc -static -O2 -o rewind-fuzz-example example_target.c
 * A SIGSEGV in a Linux target does not stop the vCPU; have the target (or
 * a signal handler, as here) ring CRASH itself.
 */
#include <signal.h>
#include <stdio.h>

#include "rewind_fuzz.h"

static struct rewind_fuzz fz;

static void on_fault(int sig)
{
	rewind_fuzz_crash(&fz, 0x5E6F0000UL | (unsigned)sig);
	_exit(128 + sig);
}

static void target(const uint8_t *d, uint32_t n, volatile uint8_t *fb)
{
	fb[0] = 1;
	if (n < 4 || d[0] != 'R')
		return;
	fb[1] = 1;
	if (d[1] != 'W')
		return;
	fb[2] = 1;
	if (d[2] != 'N')
		return;
	fb[3] = 1;
	if (d[3] != 'D')
		return;
	*(volatile int *)0 = 1;
}

int main(void)
{
	if (rewind_fuzz_open(&fz) != 0) {
		fprintf(stderr, "rewind doorbell page not found (root, /dev/mem, rewind?)\n");
		return 1;
	}
	signal(SIGSEGV, on_fault);
	rewind_fuzz_snapshot(&fz);
	uint32_t n = fz.input->len;
	if (n > sizeof(fz.input->data))
		n = sizeof(fz.input->data);
	target(fz.input->data, n, fz.feedback);
	rewind_fuzz_done(&fz);
	printf("no fuzzer attached: the input ran once\n");
	return 0;
}
