/*
 * dispatch.c - picks the kernel table by CPU features, once per process (CPUID traps to the
 * hypervisor on a VM: detecting per call cost 10+ us, issue 16), with BNORM_ISA capping the choice;
 * and the process-wide default thread count.
 */
#include "kernels.h"

#include <stdatomic.h>
#include <stdlib.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
/* F16C from CPUID leaf 1, ECX bit 29: clang before 16 does not know __builtin_cpu_supports("f16c"). */
static int bn_has_f16c(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    return (c >> 29) & 1;
}
#endif

static int bn_isa_probe(bnorm_isa isa) {
    switch (isa) {
    case BNORM_ISA_SCALAR: return 1;
#if defined(BN_HAVE_AVX2) && (defined(__x86_64__) || defined(__i386__))
    case BNORM_ISA_AVX2:
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && bn_has_f16c();
#endif
#if defined(BN_HAVE_AVX512) && (defined(__x86_64__) || defined(__i386__))
    case BNORM_ISA_AVX512:
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && bn_has_f16c();
#endif
    default: return 0;
    }
}

/* Bit i set: variant i is built and supported. -1: not probed yet. Probing twice (a race at first use)
 * stores the same value, so a relaxed atomic is enough. */
static atomic_int bn_isa_mask = -1;
/* The variant in use; -1: not chosen yet. */
static atomic_int bn_isa_current = -1;

static int bn_isa_supported(bnorm_isa isa) {
    int m = atomic_load_explicit(&bn_isa_mask, memory_order_relaxed);
    if (m < 0) {
        m = 0;
        for (int i = BNORM_ISA_SCALAR; i <= BNORM_ISA_AVX512; i++)
            if (bn_isa_probe((bnorm_isa)i)) m |= 1 << i;
        atomic_store_explicit(&bn_isa_mask, m, memory_order_relaxed);
    }
    return (unsigned)isa <= BNORM_ISA_AVX512 && ((m >> isa) & 1);
}

static int bn_isa_detect(void) {
    int best = BNORM_ISA_SCALAR;
    for (int i = BNORM_ISA_AVX512; i > BNORM_ISA_SCALAR; i--)
        if (bn_isa_supported((bnorm_isa)i)) { best = i; break; }
    const char *cap = getenv("BNORM_ISA");
    if (cap) {
        int c = best;
        if (!strcmp(cap, "scalar")) c = BNORM_ISA_SCALAR;
        else if (!strcmp(cap, "avx2")) c = BNORM_ISA_AVX2;
        else if (!strcmp(cap, "avx512")) c = BNORM_ISA_AVX512;
        while (c > BNORM_ISA_SCALAR && !bn_isa_supported((bnorm_isa)c)) c--;
        if (c < best) best = c;
    }
    return best;
}

bnorm_isa bnorm_get_isa(void) {
    int cur = atomic_load_explicit(&bn_isa_current, memory_order_relaxed);
    if (cur < 0) {
        cur = bn_isa_detect();
        atomic_store_explicit(&bn_isa_current, cur, memory_order_relaxed);
    }
    return (bnorm_isa)cur;
}

bnorm_status bnorm_set_isa(bnorm_isa isa) {
    bn_clear_error();
    if ((int)isa < BNORM_ISA_SCALAR || (int)isa > BNORM_ISA_AVX512)
        return bn_fail(BNORM_STATUS_INVALID_ARGUMENT, "bnorm_set_isa", "isa = %d: not a bnorm_isa", (int)isa);
    if (!bn_isa_supported(isa))
        return bn_fail(BNORM_STATUS_UNSUPPORTED, "bnorm_set_isa",
                       "isa = %s: not built into this library or not supported by this CPU",
                       bnorm_isa_name(isa));
    atomic_store_explicit(&bn_isa_current, (int)isa, memory_order_relaxed);
    return BNORM_STATUS_OK;
}

const char *bnorm_isa_name(bnorm_isa isa) {
    switch (isa) {
    case BNORM_ISA_SCALAR: return "scalar";
    case BNORM_ISA_AVX2: return "avx2";
    case BNORM_ISA_AVX512: return "avx512";
    }
    return "unknown";
}

const bn_kernels *bn_kernels_variant(bnorm_isa isa, bnorm_dtype dtype) {
    if (!bn_isa_supported(isa) || (unsigned)dtype > BNORM_DTYPE_BF16) return NULL;
    switch (isa) {
#ifdef BN_HAVE_AVX2
    case BNORM_ISA_AVX2: return &bn_kernels_avx2[dtype];
#endif
#ifdef BN_HAVE_AVX512
    case BNORM_ISA_AVX512: return &bn_kernels_avx512[dtype];
#endif
    default: return &bn_kernels_scalar[dtype];
    }
}

const bn_kernels *bn_kernels_for(bnorm_dtype dtype) { return bn_kernels_variant(bnorm_get_isa(), dtype); }

/* 0: no process-wide count set (the default applies). Read once per call (or plan), so a change from
 * another thread takes effect at the next call and never in the middle of one. */
static atomic_int bn_threads_setting = 0;

void bnorm_set_num_threads(int n) { atomic_store_explicit(&bn_threads_setting, n > 0 ? n : 0, memory_order_relaxed); }

int bnorm_get_num_threads(void) {
    int n = atomic_load_explicit(&bn_threads_setting, memory_order_relaxed);
    if (n > 0) return n;
#ifdef _OPENMP
    /* what OpenMP says this caller wants (OMP_NUM_THREADS, omp_set_num_threads); one thread inside a
       caller's parallel region, so a call per host thread does not oversubscribe */
    if (omp_in_parallel()) return 1;
    n = omp_get_max_threads();
    return n > 0 ? n : 1;
#else
    return 1;
#endif
}
