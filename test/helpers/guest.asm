; qmpd test guest: a 512-byte boot sector that leaves checkable traces of its
; progress in RAM and on every BIOS hard disk, so tests can prove what a
; snapshot brought back (RAM via QMP pmemsave, disks via qemu-img).
;
; Assemble:   nasm -f bin -o guest.bin test/helpers/guest.asm
; The bytes are embedded in test/helpers/guest.ts (GUEST_HEX); regenerate that
; string after any change here (see the comment there). The test suite never
; needs nasm: test/integration/guest.test.ts compares the two when nasm exists.
;
; Memory layout (guest-physical):
;   0x7c00  this boot sector (SeaBIOS loads LBA 0 of the boot disk here)
;   <0x7c00 stack (SS:SP = 0:7c00, grows down)
;   0x8000  COUNTER  dword: last fully completed iteration
;   0x8004  PENDING  dword: iteration in progress (COUNTER or COUNTER+1)
;   0x8008  ERRORS   dword: failed INT 13h writes
;   0x800c  DISKS    dword: number of disks written per iteration (BDA 0x475, max 4)
;   0x9000  sector buffer (512 bytes)
;   0x100000 + n*4096, n < stampMiB*256: first dword of each page = stamp
;
; Each iteration, with next = COUNTER + 1:
;   a. PENDING = next
;   b. for each disk 0x80 .. 0x80+DISKS-1, write one sector at
;      LBA 1 + (next mod 64) (the "slot") with INT 13h AH=43h. Sector layout,
;      as little-endian dwords:
;        dword 0       'QMPD' (bytes 51 4d 50 44)
;        dword 1       next
;        dword 2       disk index (drive number - 0x80), 0..3
;        dwords 3..127 next
;   c. first dword of every 4 KiB page in [1 MiB, 1 MiB + stampMiB MiB) = next
;   d. COUNTER = next
; So at any instant every slot holds the newest v <= COUNTER with
; v mod 64 == slot, except PENDING's slot may already hold PENDING; and every
; stamped page holds COUNTER or PENDING (a prefix of them PENDING).
;
; Byte 0x1fd of the sector (STAMP_MIB_OFFSET) is stampMiB, patched by
; bootSector() in guest.ts. The guest does not probe RAM size: the VM must
; have at least 1 MiB + stampMiB MiB of RAM (writes beyond RAM are dropped).

BITS 16
ORG 0x7c00

COUNTER     equ 0x8000
PENDING     equ 0x8004
ERRORS      equ 0x8008
DISKS       equ 0x800c
SECBUF      equ 0x9000
STAMP_BASE  equ 0x100000
BDA_HDCOUNT equ 0x475           ; BIOS data area: number of hard disks
MAX_DISKS   equ 4

start:
        cli
        xor ax, ax
        mov ds, ax
        mov es, ax
        mov ss, ax
        mov sp, 0x7c00
        ; Some BIOSes enter at 07c0:0000; force CS=0 so ORG 0x7c00 holds.
        jmp 0:.cs_ok
.cs_ok:
        sti
        cld

        ; Fast A20 (port 0x92 bit 1) so addresses above 1 MiB do not wrap.
        ; Bit 0 of the same port resets the machine: always write it as 0.
        in al, 0x92
        test al, 2
        jnz .a20_on
        or al, 2
        and al, 0xfe
        out 0x92, al
.a20_on:
        xor eax, eax
        mov [COUNTER], eax
        mov [PENDING], eax
        mov [ERRORS], eax
        mov [DISKS], eax

main_loop:
        ; a. announce the iteration before touching any disk
        mov eax, [COUNTER]
        inc eax
        mov [PENDING], eax

        ; b. build the sector: fill with next, then the header dwords
        mov di, SECBUF
        mov cx, 128
        rep stosd
        mov dword [SECBUF], 'QMPD'
        and eax, 63
        inc eax
        mov [dap.lba], eax

        movzx cx, byte [BDA_HDCOUNT]
        cmp cx, MAX_DISKS
        jbe .count_ok
        mov cx, MAX_DISKS
.count_ok:
        mov [DISKS], cx
        mov dl, 0x80
.disk:
        test cx, cx
        jz .disks_done
        push cx
        push dx
        movzx eax, dl
        sub al, 0x80
        mov [SECBUF + 8], eax
        ; The BIOS overwrites the count with the sectors actually moved on
        ; error, so reset it for every call.
        mov word [dap.count], 1
        mov si, dap
        mov ax, 0x4300          ; AH=43h extended write, AL=0 no verify
        int 0x13
        jnc .written
        inc dword [ERRORS]
.written:
        pop dx
        pop cx
        inc dl
        dec cx
        jmp .disk
.disks_done:

        ; c. stamp pages above 1 MiB. SeaBIOS runs INT 13h in 32-bit mode
        ; and returns with 64 KiB segment limits, so unreal mode must be
        ; re-entered after the disk writes, before any 32-bit address.
        call unreal
        mov eax, [PENDING]
        movzx ecx, byte [stamp_mib]
        shl ecx, 8              ; MiB -> 4 KiB pages; ZF set when 0
        jz .stamped
        mov esi, STAMP_BASE
.stamp:
        mov [fs:esi], eax       ; 0x67 address-size prefix: 32-bit offset
        add esi, 4096
        dec ecx
        jnz .stamp
.stamped:

        ; d. the iteration is complete
        mov [COUNTER], eax
        jmp main_loop

; Enter "unreal mode": real mode code whose data segment registers keep a
; cached 4 GiB limit. Real mode caps offsets at 0xffff; loading a flat
; descriptor while CR0.PE=1 sets the hidden limit to 4 GiB, and returning to
; real mode (PE=0) and reloading the selectors with 0 changes only the base,
; not the cached limit. This lets the loop address the stamp pages above
; 1 MiB while still calling BIOS services, which need real mode.
; Clobbers eax and bx; preserves the interrupt flag.
unreal:
        pushf
        cli                     ; no interrupt may run with PE=1
        lgdt [gdtr]
        mov eax, cr0
        or al, 1
        mov cr0, eax
        jmp short $+2           ; flush the prefetch queue (386/486)
        mov bx, 0x08            ; flat data selector
        mov ds, bx
        mov es, bx
        mov fs, bx
        mov gs, bx
        and al, 0xfe
        mov cr0, eax
        xor bx, bx              ; base back to 0, the 4 GiB limit stays
        mov ds, bx
        mov es, bx
        mov fs, bx
        mov gs, bx
        popf
        ret

gdt:
        dq 0                    ; null descriptor
        ; 0x08: data, base 0, limit 0xfffff pages (4 GiB), present, writable,
        ; DPL 0, granularity 4 KiB, 32-bit
        dw 0xffff, 0x0000
        db 0x00, 0x92, 0xcf, 0x00
gdt_end:

gdtr:
        dw gdt_end - gdt - 1
        dd gdt

; EDD disk address packet for INT 13h AH=43h (DS:SI points here).
dap:
        db 0x10, 0              ; packet size, reserved
.count: dw 1                    ; sectors
        dw SECBUF, 0            ; buffer offset, segment
.lba:   dd 0, 0                 ; 64-bit LBA

        times 0x1fd - ($ - $$) db 0
stamp_mib:
        db 0                    ; offset 0x1fd: MiB to stamp, patched by guest.ts
        dw 0xaa55               ; boot signature (bytes 55 aa)
