/* Picks the per-ISA primitive table once, at load time, from CPU and OS feature checks.
 * FW_KERNELS_ISA=ref|avx2|avx512|neon|auto overrides the choice (an unsupported request falls
 * back to the best supported variant below it). */
#include "fw_internal.h"

#include <string.h>

#if (defined(__x86_64__) || defined(_M_X64)) && !defined(FW_NO_SIMD)
#include <cpuid.h>
#define FW_X86 1
#endif
#if defined(__aarch64__) && !defined(FW_NO_SIMD)
#define FW_NEON 1
#endif

#if defined(FW_X86)
static uint64_t fw_xgetbv0(void) {
    uint32_t eax, edx;
    __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
    return ((uint64_t)edx << 32) | eax;
}

/* 0: none, 1: AVX2+FMA usable, 2: AVX-512 F/BW/DQ/VL usable as well */
static int fw_x86_level(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    int osxsave = (c >> 27) & 1, avx = (c >> 28) & 1, fma = (c >> 12) & 1;
    if (!osxsave || !avx || !fma) return 0;
    uint64_t xcr0 = fw_xgetbv0();
    if ((xcr0 & 0x6) != 0x6) return 0; /* OS does not save XMM/YMM state */
    if (__get_cpuid_max(0, NULL) < 7) return 0;
    __cpuid_count(7, 0, a, b, c, d);
    int avx2 = (b >> 5) & 1;
    if (!avx2) return 0;
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) return 0;
    int f = (b >> 16) & 1, dq = (b >> 17) & 1, bw = (b >> 30) & 1, vl = (b >> 31) & 1;
    if (f && dq && bw && vl && (xcr0 & 0xE6) == 0xE6 && __builtin_cpu_supports("avx512f") &&
        __builtin_cpu_supports("avx512bw"))
        return 2;
    return 1;
}
#endif

static const fw_ops *fw_best(int max_level) {
    (void)max_level;
#if defined(FW_X86)
    int lvl = fw_x86_level();
    if (lvl > max_level) lvl = max_level;
    if (lvl >= 2) return &fw_ops_avx512;
    if (lvl >= 1) return &fw_ops_avx2;
#elif defined(FW_NEON)
    if (max_level >= 1) return &fw_ops_neon;
#endif
    return &fw_ops_ref;
}

static const fw_ops *fw_lookup(const char *name, int *ok) {
    *ok = 1;
    if (!name || !*name || strcmp(name, "auto") == 0) return fw_best(99);
    if (strcmp(name, "ref") == 0) return &fw_ops_ref;
#if defined(FW_X86)
    if (strcmp(name, "avx2") == 0) {
        const fw_ops *o = fw_best(1);
        *ok = o == &fw_ops_avx2;
        return o;
    }
    if (strcmp(name, "avx512") == 0) {
        const fw_ops *o = fw_best(2);
        *ok = o == &fw_ops_avx512;
        return o;
    }
#endif
#if defined(FW_NEON)
    if (strcmp(name, "neon") == 0) return &fw_ops_neon;
#endif
    *ok = 0;
    return fw_best(99);
}

static const fw_ops *fw_current = NULL;

__attribute__((constructor)) static void fw_dispatch_init(void) {
    int ok;
    const fw_ops *o = fw_lookup(getenv("FW_KERNELS_ISA"), &ok);
    __atomic_store_n(&fw_current, o, __ATOMIC_RELEASE);
}

const fw_ops *fw_ops_get(void) {
    const fw_ops *o = __atomic_load_n(&fw_current, __ATOMIC_ACQUIRE);
    if (!o) {
        fw_dispatch_init();
        o = __atomic_load_n(&fw_current, __ATOMIC_ACQUIRE);
    }
    return o;
}

const char *fw_isa(void) { return fw_ops_get()->name; }

int fw_isa_supported(const char *name) {
    int ok;
    (void)fw_lookup(name, &ok);
    return ok;
}

int fw_set_isa(const char *name) {
    int ok;
    const fw_ops *o = fw_lookup(name, &ok);
    if (!ok) return fw_error(FW_EISA, "ISA '%s' is not supported on this machine", name ? name : "");
    __atomic_store_n(&fw_current, o, __ATOMIC_RELEASE);
    return FW_OK;
}
