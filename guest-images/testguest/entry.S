/*
 * rewind test guest: ring-0 part.
 *
 * Boot contract (set up by rewind's test-guest loader, see src/arch/boot.rs):
 *   - every vCPU enters here in 64-bit mode, CPL0, IF=0, with identity-mapped
 *     2 MiB pages (U/S set) covering all RAM, the LAPIC and the debug console;
 *   - rdi = vCPU index (equals its LAPIC ID), rsi = Linux zero page (boot_params),
 *     rdx = number of vCPUs.
 *
 * Ring-0 code is emulated instruction by instruction on PVM hosts (about 1.6 us
 * each), so this file does the minimum: per-CPU GDT+TSS, a shared IDT with
 * five gates, LAPIC enable, then iretq to ring 3 where the workload runs
 * natively. Ring 3 reaches ring 0 only through #GP: `hlt` waits for the next
 * interrupt, `out dx, al` is proxied, `cli` runs a ring-0 instruction probe
 * (or mode=hostile's port sweep).
 */
        .intel_syntax noprefix

        .set MAX_CPUS, 64
        .set KSTACK_SIZE, 16384
        .set USTACK_SIZE, 65536
        .set LAPIC, 0xFEE00000
        .set TIMER_VECTOR, 32
        .set SPURIOUS_VECTOR, 39
        .set RESUME_VECTOR, 48          /* rewind's wake-up after a restore (resumed=1) */

        .section .text.entry, "ax"
        .globl _start
_start:
        mov r15, rdi                    /* cpu index */
        mov r14, rsi                    /* zero page */
        mov r13, rdx                    /* vCPU count */

        /* kernel stack: kstacks + (cpu + 1) * KSTACK_SIZE */
        lea rax, [rdi + 1]
        shl rax, 14
        lea rsp, [kstacks + rax]

        /* per-CPU GDT: copy the 6-entry template, then the 16-byte TSS descriptor */
        mov rbx, rdi
        shl rbx, 6                      /* 8 entries * 8 bytes */
        lea rbx, [gdts + rbx]
        mov rax, [gdt_template + 16]
        mov [rbx + 16], rax
        mov rax, [gdt_template + 24]
        mov [rbx + 24], rax
        mov rax, [gdt_template + 32]
        mov [rbx + 32], rax
        mov rax, [gdt_template + 40]
        mov [rbx + 40], rax

        mov rcx, rdi
        shl rcx, 7                      /* 128 bytes per TSS */
        lea rcx, [tsses + rcx]
        mov [rcx + 4], rsp              /* RSP0: interrupts from ring 3 land here */

        /* TSS descriptor: limit 0x67, type 0x9 (available 64-bit TSS), present */
        mov rax, rcx
        and rax, 0xFFFFFF
        shl rax, 16
        or rax, 0x67
        mov rdx, 0x89
        shl rdx, 40
        or rax, rdx
        mov rdx, rcx
        shr rdx, 24
        and rdx, 0xFF
        shl rdx, 56
        or rax, rdx
        mov [rbx + 48], rax
        mov rdx, rcx
        shr rdx, 32
        mov [rbx + 56], rdx

        mov rdx, rdi
        shl rdx, 4
        lea rdx, [gdt_desc_scratch + rdx]
        mov word ptr [rdx], 63
        mov [rdx + 2], rbx
        lgdt [rdx]
        mov ax, 0x30
        ltr ax

        /* IDT: every vCPU writes the same gates, so the race is harmless */
        lea rax, [bp_isr]
        mov rdi, 3
        call set_gate
        lea rax, [gp_isr]
        mov rdi, 13
        call set_gate
        lea rax, [timer_isr]
        mov rdi, TIMER_VECTOR
        call set_gate
        lea rax, [spurious_isr]
        mov rdi, SPURIOUS_VECTOR
        call set_gate
        lea rax, [resume_isr]
        mov rdi, RESUME_VECTOR
        call set_gate
        lidt [idt_desc]

        /* LAPIC: software-enable, periodic timer on TIMER_VECTOR, divide by 1.
         * Ring 3 writes the initial count (which starts the timer) once it has
         * read the period from the command line: parsing is native there. */
        mov rbx, LAPIC
        mov dword ptr [rbx + 0xF0], 0x100 | SPURIOUS_VECTOR
        mov dword ptr [rbx + 0x3E0], 0xB
        mov dword ptr [rbx + 0x320], TIMER_VECTOR | (1 << 17)

        /* drop to ring 3: user_main(cpu, zero_page, ncpus) on the per-CPU user stack */
        lea rax, [r15 + 1]
        shl rax, 16
        lea rax, [ustacks + rax]
        push 0x23                       /* SS: user data */
        push rax                        /* RSP */
        push 0x202                      /* RFLAGS: IF */
        push 0x2B                       /* CS: user code */
        lea rax, [user_main]
        push rax
        mov rdi, r15
        mov rsi, r14
        mov rdx, r13
        iretq

/* rdi = vector, rax = handler (below 4 GiB); 64-bit interrupt gate, selector 0x10 */
set_gate:
        shl rdi, 4
        lea rdi, [idt + rdi]
        mov rdx, rax
        and rdx, 0xFFFF
        mov rcx, 0x10
        shl rcx, 16
        or rdx, rcx
        mov rcx, 0x8E
        shl rcx, 40
        or rdx, rcx
        mov rcx, rax
        shr rcx, 16
        and rcx, 0xFFFF
        shl rcx, 48
        or rdx, rcx
        mov [rdi], rdx
        mov qword ptr [rdi + 8], 0
        ret

/* LAPIC timer: count the tick for this CPU (indexed by APIC ID), EOI. */
timer_isr:
        push rax
        push rbx
        mov rbx, LAPIC
        mov eax, [rbx + 0x20]
        shr eax, 24
        lock inc qword ptr [ticks + rax * 8]
        mov dword ptr [rbx + 0xB0], 0
        pop rbx
        pop rax
        iretq

/* Sent by rewind right after a restore: count it, so ring 3 (woken from
 * `hlt` by this very interrupt) can say at once that it runs again. */
resume_isr:
        push rax
        push rbx
        mov rbx, LAPIC
        mov eax, [rbx + 0x20]
        shr eax, 24
        lock inc qword ptr [resumes + rax * 8]
        mov dword ptr [rbx + 0xB0], 0
        pop rbx
        pop rax
        iretq

spurious_isr:
        iretq

/* #BP: the VMM's emulation assist injects it after completing an int3 */
bp_isr:
        iretq

/* #GP from ring 3 is the only way up. Frame: [rsp]=error code, then RIP, CS... */
gp_isr:
        push rax
        mov rax, [rsp + 16]             /* faulting RIP */
        cmp byte ptr [rax], 0xF4        /* hlt: wait for the next interrupt */
        je 1f
        cmp byte ptr [rax], 0xEE        /* out dx, al: proxy the port write */
        je 2f
        cmp byte ptr [rax], 0xFA        /* cli: ring-0 instruction probe, code in rax */
        je 3f
        ud2                             /* anything else: fatal by design */
1:      pop rax
        add qword ptr [rsp + 8], 1
        add rsp, 8
        sti
        hlt
        cli
        iretq
2:      pop rax
        out dx, al
        jmp 9f
3:      pop rax
        cmp rax, 1
        jne 4f
        int3
        jmp 9f
4:      cmp rax, 2
        jne 5f
        fwait
        jmp 9f
5:      cmp rax, 3
        jne 6f
        popcnt rax, rax
        jmp 9f
6:      cmp rax, 8                      /* flush the TLB: mode=fuzz ptchange=1 remapped a window */
        jne 8f
        mov rax, cr3
        mov cr3, rax
        jmp 9f
8:      cmp rax, 9                      /* switch address space to rbx: mode=fuzz cr3switch=1 */
        jne 7f
        mov cr3, rbx
        jmp 9f
7:      cmp rax, 4                      /* MXCSR round trip: set from rbx, read back into rax */
        jne 17f
        sub rsp, 16
        mov [rsp], ebx
        ldmxcsr [rsp]
        mov dword ptr [rsp + 4], 0
        stmxcsr [rsp + 4]
        mov eax, [rsp + 4]
        add rsp, 16
        jmp 9f
17:     cmp rax, 10                     /* KERNEL_GS_BASE swap: old into rax, rbx written (mode=fuzz msrchange=1) */
        jne 10f
        push rcx
        push rdx
        mov ecx, 0xC0000102
        rdmsr
        shl rdx, 32
        or rax, rdx
        push rax
        mov rax, rbx
        mov rdx, rbx
        shr rdx, 32
        wrmsr
        pop rax
        pop rdx
        pop rcx
        jmp 9f
/* mode=hostile port sweep over ports [rbx, rcx): read, then write the
 * value in rsi; rax = 5, 6, 7 for 1, 2, 4 bytes. One trap for the whole
 * range: a trap per port would cost ~50 us of emulated ring-0 code. */
10:     cmp rax, 5
        jb 9f
        cmp rax, 7
        ja 9f
        push rdx
        mov rdx, rbx
11:     cmp rdx, rcx
        jae 15f
        cmp rax, 6
        je 13f
        ja 14f
        push rax
        in al, dx
        mov rax, rsi
        out dx, al
        pop rax
        jmp 16f
13:     push rax
        in ax, dx
        mov rax, rsi
        out dx, ax
        pop rax
        jmp 16f
14:     push rax
        in eax, dx
        mov rax, rsi
        out dx, eax
        pop rax
16:     inc rdx
        jmp 11b
15:     pop rdx
9:      add qword ptr [rsp + 8], 1
        add rsp, 8
        iretq

        .section .rodata
        .balign 8
gdt_template:
        .quad 0                         /* 0x00 null */
        .quad 0                         /* 0x08 unused (Linux boot protocol layout) */
        .quad 0x00AF9A000000FFFF        /* 0x10 kernel code 64 */
        .quad 0x00CF92000000FFFF        /* 0x18 kernel data */
        .quad 0x00CFF2000000FFFF        /* 0x20 user data (0x23) */
        .quad 0x00AFFA000000FFFF        /* 0x28 user code 64 (0x2B) */

        .balign 16
idt_desc:
        .word 256 * 16 - 1
        .quad idt

        .section .bss
        .balign 4096
        .globl ticks
ticks:  .skip 8 * MAX_CPUS
        .globl resumes
resumes: .skip 8 * MAX_CPUS
        .balign 4096
idt:    .skip 256 * 16
gdts:   .skip 64 * MAX_CPUS
tsses:  .skip 128 * MAX_CPUS
gdt_desc_scratch: .skip 16 * MAX_CPUS
        .balign 4096
kstacks: .skip KSTACK_SIZE * MAX_CPUS
        .globl ustacks
ustacks: .skip USTACK_SIZE * MAX_CPUS
        .section .note.GNU-stack,"",@progbits
