# Ember's Firecracker test guest: a few hundred bytes of x86-64 that boot as
# an ELF "kernel" and print progress on the serial port.
#
# Firecracker enters an ELF kernel that has no PVH note in 64-bit long mode,
# with the first GiB identity-mapped (2 MiB pages), interrupts disabled and
# rsi pointing at the boot parameters. The guest needs none of that beyond
# the identity map: it runs with its own stack and never takes an interrupt.
#
# What it prints, one line each (all numbers 16 hex digits):
#   ember-test-guest
#   fill=<checksum of the pattern just written>
#   tick=<counter> sum=<checksum of the pattern, re-read from memory>
#   ...
# The counter lives alone in its own page, so a diff snapshot taken while the
# guest runs holds that page (and the stack) and none of the pattern's pages.
# The checksum is order-sensitive, so a page served at the wrong offset on
# restore changes it.

        .set SERIAL_PORT, 0x3f8
        .set PATTERN_BASE, 0x400000
        .set PATTERN_BYTES, 0x400000
        .set PATTERN_STRIDE, 128
        .set PATTERN_MUL, 0x9e3779b97f4a7c15
        .set TICK_DELAY, 0x8000

        .code64
        .section .text
        .globl _start
_start:
        cli
        lea     stack_top(%rip), %rsp
        lea     banner(%rip), %rsi
        call    puts
        call    fill_pattern
        call    checksum
        mov     %rax, %r12
        lea     fill_label(%rip), %rsi
        call    puts
        mov     %r12, %rax
        call    puthex
        mov     $'\n', %al
        call    putc

tick:
        mov     $TICK_DELAY, %rcx
1:      dec     %rcx
        jnz     1b
        incq    counter(%rip)
        lea     tick_label(%rip), %rsi
        call    puts
        mov     counter(%rip), %rax
        call    puthex
        lea     sum_label(%rip), %rsi
        call    puts
        call    checksum
        call    puthex
        mov     $'\n', %al
        call    putc
        jmp     tick

# One word every PATTERN_STRIDE bytes (so every page is written, but this
# guest, which runs slowly under a nested hypervisor, still ticks several
# times a second): the word at address a holds (a * PATTERN_MUL) ^ a.
fill_pattern:
        mov     $PATTERN_BASE, %rdi
        mov     $(PATTERN_BASE + PATTERN_BYTES), %r8
        movabs  $PATTERN_MUL, %r9
1:      mov     %rdi, %rax
        imul    %r9, %rax
        xor     %rdi, %rax
        mov     %rax, (%rdi)
        add     $PATTERN_STRIDE, %rdi
        cmp     %r8, %rdi
        jb      1b
        ret

# rax = fold over the pattern's words, in address order, of h = rol(h, 7) + word.
checksum:
        mov     $PATTERN_BASE, %rdi
        mov     $(PATTERN_BASE + PATTERN_BYTES), %r8
        xor     %eax, %eax
1:      rol     $7, %rax
        add     (%rdi), %rax
        add     $PATTERN_STRIDE, %rdi
        cmp     %r8, %rdi
        jb      1b
        ret

# Print rax as 16 hex digits.
puthex:
        mov     %rax, %rbx
        mov     $16, %ecx
1:      rol     $4, %rbx
        mov     %ebx, %eax
        and     $0xf, %eax
        lea     hex_digits(%rip), %rsi
        mov     (%rsi,%rax), %al
        call    putc
        dec     %ecx
        jnz     1b
        ret

# Print the NUL-terminated string at rsi.
puts:
1:      lodsb
        test    %al, %al
        jz      2f
        call    putc
        jmp     1b
2:      ret

putc:
        mov     $SERIAL_PORT, %dx
        out     %al, %dx
        ret

        .section .rodata
banner:     .asciz "ember-test-guest\n"
fill_label: .asciz "fill="
tick_label: .asciz "tick="
sum_label:  .asciz " sum="
hex_digits: .ascii "0123456789abcdef"

        .section .bss
        .balign 4096
counter:
        .quad   0
        .balign 4096
stack:
        .skip   16384
stack_top:
