# A guest for restoring a real Firecracker snapshot through `ember uffd`:
# a few dozen instructions that boot as an ELF "kernel" (Firecracker enters
# it in 64-bit mode with the first GiB identity-mapped), write one word into
# every page of 16 MiB, then forever re-read all of them and print a
# checksum on the serial port:
#   ember-uffd-guest
#   sum=<16 hex digits>     (repeated)
# After a restore every re-read page comes from the page server, and a page
# served from the wrong place changes the checksum.

        .set SERIAL, 0x3f8
        .set BASE, 0x800000
        .set BYTES, 0x1000000
        .set MUL, 0x9e3779b97f4a7c15
        .set DELAY, 0x40000

        .code64
        .section .text
        .globl _start
_start:
        cli
        lea     stack_top(%rip), %rsp
        lea     banner(%rip), %rsi
        call    puts
        mov     $BASE, %rdi
        movabs  $MUL, %r9
1:      mov     %rdi, %rax
        imul    %r9, %rax
        xor     %rdi, %rax
        mov     %rax, (%rdi)
        add     $4096, %rdi
        cmp     $(BASE + BYTES), %rdi
        jb      1b
again:
        xor     %rax, %rax
        mov     $BASE, %rdi
2:      rol     $7, %rax
        add     (%rdi), %rax
        add     $4096, %rdi
        cmp     $(BASE + BYTES), %rdi
        jb      2b
        mov     %rax, %r12
        lea     sum_label(%rip), %rsi
        call    puts
        mov     $16, %rcx
3:      rol     $4, %r12
        mov     %r12, %rax
        and     $0xf, %rax
        lea     hex(%rip), %rbx
        mov     (%rbx,%rax), %al
        call    putc
        dec     %rcx
        jnz     3b
        mov     $'\n', %al
        call    putc
        mov     $DELAY, %rcx
4:      dec     %rcx
        jnz     4b
        jmp     again

# Print the NUL-terminated string at rsi.
puts:
        mov     (%rsi), %al
        test    %al, %al
        jz      1f
        call    putc
        inc     %rsi
        jmp     puts
1:      ret

# Write al to the serial port.
putc:
        mov     $SERIAL, %dx
        out     %al, %dx
        ret

        .section .rodata
banner:     .asciz "ember-uffd-guest\n"
sum_label:  .asciz "sum="
hex:        .ascii "0123456789abcdef"

        .section .bss
        .align 4096
stack:      .skip 4096
stack_top:
