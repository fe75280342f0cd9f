/* Makes a patched ONNX Runtime see an AVX2-only x86-64 CPU (no AVX-512, no AVX-VNNI, no AMX).
 *
 * make_ort_avx2.py replaces every `cpuid` (0f a2) in a copy of ONNX Runtime's Python extension
 * with `int3; nop` (cc 90). This library, LD_PRELOADed, turns each resulting SIGTRAP into the real
 * cpuid with the AVX-512 / VNNI / AMX feature bits cleared, so MLAS dispatches exactly the kernels
 * it runs on an AVX2-only CPU, at native speed (qemu's emulation is faithful in numbers, not time).
 * Only used by benchmarks and by people checking the AVX2 path on a newer CPU; never shipped.
 */
#define _GNU_SOURCE
#include <cpuid.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <ucontext.h>

static void clear_avx512_vnni_amx(uint32_t leaf, uint32_t subleaf, uint32_t regs[4]) {
    enum { EAX, EBX, ECX, EDX };
    if (leaf == 7 && subleaf == 0) {
        /* AVX512 F DQ IFMA PF ER CD BW VL */
        regs[EBX] &= ~((1u << 16) | (1u << 17) | (1u << 21) | (1u << 26) | (1u << 27) |
                       (1u << 28) | (1u << 30) | (1u << 31));
        /* AVX512 VBMI VBMI2 VNNI BITALG VPOPCNTDQ */
        regs[ECX] &= ~((1u << 1) | (1u << 6) | (1u << 11) | (1u << 12) | (1u << 14));
        /* AVX512 4VNNIW 4FMAPS VP2INTERSECT, AMX-BF16, AVX512-FP16, AMX-TILE, AMX-INT8 */
        regs[EDX] &= ~((1u << 2) | (1u << 3) | (1u << 8) | (1u << 22) | (1u << 23) |
                       (1u << 24) | (1u << 25));
    } else if (leaf == 7 && subleaf == 1) {
        /* AVX-VNNI, AVX512-BF16, AMX-FP16, AVX-IFMA */
        regs[EAX] &= ~((1u << 4) | (1u << 5) | (1u << 21) | (1u << 23));
        /* AVX-VNNI-INT8, AVX-NE-CONVERT, AVX-VNNI-INT16 */
        regs[EDX] &= ~((1u << 4) | (1u << 5) | (1u << 10));
    }
}

static void on_trap(int sig, siginfo_t *info, void *context) {
    (void)sig;
    (void)info;
    mcontext_t *m = &((ucontext_t *)context)->uc_mcontext;
    const uint8_t *ip = (const uint8_t *)m->gregs[REG_RIP];
    if (ip[-1] != 0xcc || ip[0] != 0x90) return; /* not one of ours: let the next trap be fatal */
    uint32_t leaf = (uint32_t)m->gregs[REG_RAX], subleaf = (uint32_t)m->gregs[REG_RCX];
    uint32_t regs[4];
    __cpuid_count(leaf, subleaf, regs[0], regs[1], regs[2], regs[3]);
    clear_avx512_vnni_amx(leaf, subleaf, regs);
    m->gregs[REG_RAX] = regs[0];
    m->gregs[REG_RBX] = regs[1];
    m->gregs[REG_RCX] = regs[2];
    m->gregs[REG_RDX] = regs[3];
    m->gregs[REG_RIP] += 1; /* step over the nop that followed the int3 */
}

__attribute__((constructor)) static void install(void) {
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_sigaction = on_trap;
    action.sa_flags = SA_SIGINFO;
    sigaction(SIGTRAP, &action, NULL);
}
