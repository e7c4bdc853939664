/*
 * tuning.c - schedule parameters derived from the CPU the library runs on, settled once per process
 * (docs/performance.md, "Tuning rule"): the data cache sizes and the vendor, from CPUID (sysconf as a
 * fallback), each checked against a plausible range (hypervisors report odd values: an AMD EPYC VM
 * of this project reports a 508 MiB L3 in leaf 0x80000006), and what the measurements behind each rule
 * chose for that vendor.
 *
 * BNORM_ROWS_WALK=row|block, BNORM_ROWS_STREAM=always|never and BNORM_PLANES_STREAM=always|never
 * override the measured choices (comparisons, and the tests, which run each way on every machine).
 */
#include "kernels.h"

#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

static bn_tuning bn_tune_value;
static atomic_int bn_tune_ready = 0;

/* Deterministic cache parameters (Intel leaf 4, AMD leaf 0x8000001D with the same layout): the size
 * of the first data or unified cache of `level`, in bytes; 0 if not found. */
#if defined(__x86_64__) || defined(__i386__)
static size_t bn_cpuid_cache(unsigned leaf, int level) {
    unsigned a, b, c, d;
    for (unsigned i = 0; i < 16; i++) {
        __cpuid_count(leaf, i, a, b, c, d);
        const unsigned type = a & 31, lvl = (a >> 5) & 7;
        if (type == 0) break;
        if (lvl == (unsigned)level && (type == 1 || type == 3)) {
            const size_t ways = (b >> 22) + 1, parts = ((b >> 12) & 0x3ff) + 1, line = (b & 0xfff) + 1;
            return ways * parts * line * ((size_t)c + 1);
        }
    }
    return 0;
}
#endif

static size_t bn_clamp_cache(size_t v, size_t lo, size_t hi) { return v >= lo && v <= hi ? v : 0; }

static void bn_tuning_detect(bn_tuning *t) {
    memset(t, 0, sizeof *t);
    t->vendor = BN_VENDOR_OTHER;
    t->source = "defaults";
#if defined(__x86_64__) || defined(__i386__)
    unsigned a, b, c, d;
    if (__get_cpuid(0, &a, &b, &c, &d)) {
        char v[13];
        memcpy(v, &b, 4);
        memcpy(v + 4, &d, 4);
        memcpy(v + 8, &c, 4);
        v[12] = 0;
        const unsigned maxleaf = a;
        if (!strcmp(v, "GenuineIntel")) t->vendor = BN_VENDOR_INTEL;
        else if (!strcmp(v, "AuthenticAMD") || !strcmp(v, "HygonGenuine")) t->vendor = BN_VENDOR_AMD;
        unsigned maxext = 0;
        if (__get_cpuid(0x80000000u, &a, &b, &c, &d)) maxext = a;
        if (t->vendor == BN_VENDOR_INTEL && maxleaf >= 4) {
            t->l1d = bn_cpuid_cache(4, 1);
            t->l2 = bn_cpuid_cache(4, 2);
            t->l3 = bn_cpuid_cache(4, 3);
        } else if (t->vendor == BN_VENDOR_AMD) {
            /* leaf 0x8000001D needs the topology extensions (CPUID 0x80000001 ECX bit 22) */
            if (maxext >= 0x8000001Du && __get_cpuid(0x80000001u, &a, &b, &c, &d) && (c >> 22 & 1)) {
                t->l1d = bn_cpuid_cache(0x8000001Du, 1);
                t->l2 = bn_cpuid_cache(0x8000001Du, 2);
                t->l3 = bn_cpuid_cache(0x8000001Du, 3);
            }
            if (!t->l1d && maxext >= 0x80000005u && __get_cpuid(0x80000005u, &a, &b, &c, &d)) t->l1d = (size_t)(c >> 24) << 10;
            if (maxext >= 0x80000006u && __get_cpuid(0x80000006u, &a, &b, &c, &d)) {
                if (!t->l2) t->l2 = (size_t)(c >> 16) << 10;
                if (!t->l3) t->l3 = (size_t)(d >> 18) << 19;
            }
        }
        if (t->l1d || t->l2) t->source = "cpuid";
    }
#endif
#if defined(_SC_LEVEL1_DCACHE_SIZE) && defined(_SC_LEVEL2_CACHE_SIZE)
    if (!t->l1d || !t->l2) {
        long l1 = sysconf(_SC_LEVEL1_DCACHE_SIZE), l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
        if (!t->l1d && l1 > 0) t->l1d = (size_t)l1;
        if (!t->l2 && l2 > 0) t->l2 = (size_t)l2;
        if (l1 > 0 || l2 > 0) t->source = "sysconf";
    }
#endif
    /* plausible ranges; anything else is treated as unknown */
    t->l1d = bn_clamp_cache(t->l1d, (size_t)8 << 10, (size_t)256 << 10);
    t->l2 = bn_clamp_cache(t->l2, (size_t)128 << 10, (size_t)16 << 20);
    t->l3 = bn_clamp_cache(t->l3, (size_t)1 << 20, (size_t)256 << 20);

    /* Rules (docs/performance.md, "Tuning rule"):
       - channel schedule (channels-first planes): a block of channels' slices fills half the L2
         (1 MiB on the 2 MiB-L2 Xeon where it was measured; 512 KiB on a 1 MiB-L2 EPYC);
       - row kernels: a group of rows is a third of the L1 data cache (16 KiB on both 48 KiB parts);
       - rows walk: register-blocked columns (a block of 16 channels down a group of rows) measured
         faster on the Xeon for narrow rows; on the EPYC (Zen 5) that walk reads one line per row at a
         256-byte stride and ran the C = 64 backward sums at 7.9 ms against 5.4 ms row by row, and
         with wide rows added four to a pass (kernel_impl.h, bn_rows_wide) the row walk is as
         fast or faster at every width measured (float32 NHWC training forward, 2 threads: C = 1024
         1.17-1.37 ms against 1.62-1.87 ms in blocks, C = 2048 0.50-0.52 against 0.52-0.57, C = 4096
         level; bfloat16 C = 4096 0.59-0.61 against 1.17-1.18), so AMD parts walk every row width
         row by row. */
    const size_t l1 = t->l1d ? t->l1d : (size_t)48 << 10, l2 = t->l2 ? t->l2 : (size_t)2 << 20;
    t->l1d_or_default = l1;
    t->l2_budget = l2 / 2;
    if (t->l2_budget < ((size_t)256 << 10)) t->l2_budget = (size_t)256 << 10;
    t->row_group_bytes = l1 / 3;
    if (t->row_group_bytes < ((size_t)8 << 10)) t->row_group_bytes = (size_t)8 << 10;
    t->apply_piece_bytes = (size_t)64 << 10;
    /* Training forward on rows, apply pass: back to front in 64 KiB pieces re-reads the cached tail of
       the statistics pass (the Xeon's choice); on the EPYC front to back measured as fast or faster
       (NHWC 32x64x56x56 0.77-0.91 -> 0.88-0.92x of oneDNN, 32x512x28x28 0.92-1.22 -> 1.14-1.30x,
       the others level), its prefetchers following one ascending stream better than 64 KiB pieces
       walked backwards. */
    t->apply_back_to_front = t->vendor != BN_VENDOR_AMD;
    t->row_walk_max_bytes = t->vendor == BN_VENDOR_AMD ? ~(size_t)0 >> 1 : 0;
    /* Streaming (non-temporal) stores of rows outputs: from 1 MiB on Intel (docs/performance.md note 22,
       the Xeon). On AMD, until session 11, above half the L3 of the core's CCX (32 MiB when the L3 is
       unknown: Zen 3-5 CCXs have 32 MiB), where x and y no longer fit it together: the EPYC VM,
       env A/B in one window, measured outputs of 3.2-12.8 MiB written through the cache faster (NHWC inference 32x256x14x14 0.97-1.13 -> 1.26-1.47x of oneDNN,
       32x512x7x7 0.79-0.97 -> 1.13-1.16x, 32x128x28x28 training forward 0.77-0.81 -> 0.98-1.08x),
       12.8 MiB at C = 2048 level, 16 MiB (4096x1024) backward 0.75-0.82x streamed against 0.81-0.90x,
       25.7 MiB level or mixed, 32 MiB (NWC 64x256x1024) faster streamed (1.03-1.46x against 0.92-1.24x). */
    /* Session 11 lowered the AMD forward threshold to 3/8 of the L3 (x and y over three quarters of it:
       12 MiB when the L3 is unknown): env A/B, 3 alternations each, 2 threads, outputs of 12.8 MiB
       (NHWC 32x2048x7x7) streamed 1.04-1.12x faster in inference and 1.02-1.08x in training forward,
       16 MiB ((4096,1024)) inference 0.92/0.80/0.95x -> 1.08/0.95/1.02x of oneDNN and training level or
       better; the outputs below that (3.2-6.4 MiB) stay through the cache as measured above. */
    const size_t l3_or_default = t->l3 ? t->l3 : (size_t)32 << 20;
    if (t->vendor == BN_VENDOR_AMD) /* x and y over three quarters of the L3 */
        t->stream_rows_min_bytes = l3_or_default / 8 * 3;
    else
        t->stream_rows_min_bytes = (size_t)1 << 20;
    /* The backward's dx, by the same rule over the three tensors it touches (x, dy and dx more than half
       the L3: outputs above 16/3 MiB on the EPYC). Session 9, in-process A/B with dx stored from the
       registers (kernel_impl.h, BN_NT_WIDE), 9 rounds, 1 and 2 threads: streamed dx 1.11-1.12x faster at
       NHWC 32x2048x7x7 (12.8 MiB) and 1.11-1.13x at 4096x1024 (16 MiB); level (1.00-1.01x) at 3.2 MiB
       (32x512x7x7, 32x256x14x14, 32x128x28x28). The forward keeps its threshold: streaming those
       outputs measured 0.94-0.99x in training and 0.98-1.11x in inference. */
    t->stream_rows_bwd_min_bytes =
        t->vendor == BN_VENDOR_AMD ? l3_or_default / 6 + 1 : t->stream_rows_min_bytes;

    t->stream_planes_min_bytes = (size_t)16 << 20;
    /* Inference on planes is one flat walk (x read once): on the EPYC its output written through the
       cache measured 12-25% faster than streamed on 28x28 to 112x112 planes in a quiet round and
       level in a loaded one; the Xeon keeps streaming (note 22). Training schedules re-read x from
       the cache and keep streaming on both (unstreamed, 64x256x1024 NCW training forward went from
       3.6 to 7.1 ms on the EPYC). */
    t->stream_planes_inference = t->vendor != BN_VENDOR_AMD;
    const char *sp = getenv("BNORM_PLANES_STREAM");
    if (sp && !strcmp(sp, "always")) t->stream_planes_min_bytes = 0, t->stream_planes_inference = 1;
    else if (sp && !strcmp(sp, "never")) t->stream_planes_min_bytes = ~(size_t)0 >> 1;
    const char *st = getenv("BNORM_ROWS_STREAM");
    if (st && !strcmp(st, "always")) t->stream_rows_min_bytes = t->stream_rows_bwd_min_bytes = 0;
    else if (st && !strcmp(st, "never")) t->stream_rows_min_bytes = t->stream_rows_bwd_min_bytes = ~(size_t)0 >> 1;
    const char *w = getenv("BNORM_ROWS_WALK");
    if (w && !strcmp(w, "row")) t->row_walk_max_bytes = ~(size_t)0 >> 1;
    else if (w && !strcmp(w, "block")) t->row_walk_max_bytes = 0;
    char l3[32] = "unknown";
    if (t->l3) snprintf(l3, sizeof l3, "%zuM", t->l3 >> 20);
    char rs[32] = "never";
    if (t->stream_rows_min_bytes <= ((size_t)1 << 40)) snprintf(rs, sizeof rs, "%zuK", t->stream_rows_min_bytes >> 10);
    char rb[32] = "never";
    if (t->stream_rows_bwd_min_bytes <= ((size_t)1 << 40))
        snprintf(rb, sizeof rb, "%zuK", t->stream_rows_bwd_min_bytes >> 10);
    snprintf(t->text, sizeof t->text, "%s,l1d=%zuK,l2=%zuK,l3=%s(%s),chanblock=%zuK,rowgroup=%zuK,rowwalk<=%s,rowstream>=%s,bwdstream>=%s,inferstream=%s,apply=%s",
             t->vendor == BN_VENDOR_INTEL ? "intel" : t->vendor == BN_VENDOR_AMD ? "amd" : "other", t->l1d >> 10,
             t->l2 >> 10, l3, t->source, t->l2_budget >> 10,
             t->row_group_bytes >> 10,
             t->row_walk_max_bytes ? "all" : "0",
             rs, rb,
             t->stream_planes_inference ? "planes" : "no", t->apply_back_to_front ? "back" : "front");
}

const bn_tuning *bn_tuning_get(void) {
    if (!atomic_load_explicit(&bn_tune_ready, memory_order_acquire)) {
        /* a race at first use computes the same values twice; the flag publishes them */
        static atomic_flag busy = ATOMIC_FLAG_INIT;
        if (!atomic_flag_test_and_set_explicit(&busy, memory_order_acquire)) {
            bn_tuning_detect(&bn_tune_value);
            atomic_store_explicit(&bn_tune_ready, 1, memory_order_release);
        } else {
            while (!atomic_load_explicit(&bn_tune_ready, memory_order_acquire)) {
            }
        }
    }
    return &bn_tune_value;
}
