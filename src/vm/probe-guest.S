# qmpd's accelerator probe guest (src/vm/accel-probe.ts): a 512-byte boot sector that does what
# a Linux kernel's decompressor does first: protected mode, PAE paging, long mode, then a 64 MiB
# memset with paging on. It prints a letter on COM1 after each stage (R P E G L W) and ends with
# `out 0x10, 0xf4` on an isa-debug-exit device: QEMU exits with status 33.
# Assemble (GNU as, binutils):
#   as --32 -o g.o src/vm/probe-guest.S && ld -m elf_i386 -Ttext 0x7c00 -e 0x7c00 --oformat binary -o g.bin g.o
# The bytes are embedded in src/vm/probe-guest.ts; test/vm/accel-probe.test.ts compares them when as and ld exist.
        .code16
start:
        cli
        xorw %ax, %ax
        movw %ax, %ds
        movw %ax, %es
        movw %ax, %ss
        movw $0x7c00, %sp
        ljmp $0, $real
real:
        movw $0x3f8, %dx
        movb $'R', %al
        outb %al, %dx
        # Page tables: PML4 at 0x1000, PDPT at 0x2000, PD at 0x3000 mapping 0..1 GiB in 2 MiB pages.
        movw $0x1000, %di
        movw $0x1800, %cx
        xorw %ax, %ax
        rep stosw
        movw $0x2003, 0x1000
        movw $0x3003, 0x2000
        movw $0x3000, %di
        movl $0x83, %eax
        movw $512, %cx
1:      movl %eax, (%di)
        addl $0x200000, %eax
        addw $8, %di
        loop 1b
        lgdt gdtr
        movl %cr0, %eax
        orb $1, %al
        movl %eax, %cr0
        ljmp $0x08, $prot
        .code32
prot:
        movw $0x10, %ax
        movw %ax, %ds
        movw %ax, %es
        movw %ax, %ss
        movw $0x3f8, %dx
        movb $'P', %al
        outb %al, %dx
        movl %cr4, %eax
        orl $0x20, %eax                 # CR4.PAE
        movl %eax, %cr4
        movl $0x1000, %eax
        movl %eax, %cr3
        movl $0xc0000080, %ecx          # EFER
        rdmsr
        orl $0x100, %eax                # EFER.LME
        wrmsr
        movw $0x3f8, %dx                # rdmsr set EDX
        movb $'E', %al
        outb %al, %dx
        movl %cr0, %eax
        orl $0x80000000, %eax           # CR0.PG: long mode is active from here
        movl %eax, %cr0
        movb $'G', %al
        outb %al, %dx
        ljmp $0x18, $long
        .code64
long:
        movb $'L', %al
        outb %al, %dx
        # 64 MiB from 2 MiB on (the VM has 128 MiB): ~0.1 s under TCG, ~30 s under the nested KVM
        # where a Linux kernel never gets out of its decompressor.
        movq $0x200000, %rdi
        movq $(64 * 1024 * 1024 / 8), %rcx
        movq $0x5150, %rax
        rep stosq
        movb $'W', %al
        outb %al, %dx
        movb $0x10, %al
        outb %al, $0xf4
2:      hlt
        jmp 2b
        .p2align 3
gdt:
        .quad 0
        .quad 0x00cf9a000000ffff        # 0x08 32-bit code
        .quad 0x00cf92000000ffff        # 0x10 data
        .quad 0x00af9a000000ffff        # 0x18 64-bit code
gdtr:
        .word gdtr - gdt - 1
        .long gdt
        .org 510
        .byte 0x55, 0xaa
