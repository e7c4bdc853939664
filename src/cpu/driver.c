/*
 * driver.c - the functional level on the CPU: validates, splits the work over OpenMP threads (the
 * only place that threads), merges partial statistics in a fixed order, talks to the communicator,
 * and calls the kernels of kernels.h on contiguous pieces.
 *
 * Two schedules:
 *   - channel schedule (channels-first planes, no communicator, C >= threads): a thread owns whole
 *     channels and does statistics and normalization of one channel back to back, so the channel's
 *     slice is read from DRAM once and re-read from cache. Results do not depend on the thread count.
 *   - split schedule (everything else): phase 1 gives each thread a contiguous range of planes or
 *     rows and produces per-channel partials; they are merged in thread order (and, with a
 *     communicator, in rank order); phase 2 applies. Results depend on the thread count only.
 */
#include "../core/plan.h"
#include "kernels.h"
#include "simd.h"

#include <assert.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>



/* Outputs of at least this many bytes are written with streaming (non-temporal) stores: they do not
 * stay cached for the next layer anyway, and streaming saves the read-for-ownership of every output
 * line and keeps the input's cached slice from being evicted. Measured thresholds (docs/performance.md
 * note 22): rows (channels-last, (N,C)) gain from 1 MiB on the Xeon, L3-sized NHWC tensors included
 * (on AMD they stream only above half the L3: tuning.c); planes
 * (channels-first) of 1-16 MiB measured slower streamed than cached, so they keep 16 MiB.
 * BN_STREAM_MIN_BYTES overrides both (tests, comparisons). */
#ifdef BN_STREAM_MIN_BYTES
#define BN_STREAM_MIN_PLANES BN_STREAM_MIN_BYTES
#define BN_STREAM_MIN_ROWS BN_STREAM_MIN_BYTES
#define BN_STREAM_MIN_ROWS_BWD BN_STREAM_MIN_BYTES
#else
#define BN_STREAM_MIN_PLANES ((double)bn_tuning_get()->stream_planes_min_bytes)
#define BN_STREAM_MIN_ROWS ((double)bn_tuning_get()->stream_rows_min_bytes)
#define BN_STREAM_MIN_ROWS_BWD ((double)bn_tuning_get()->stream_rows_bwd_min_bytes)
#endif
#ifndef BN_BWD_REVERSE
#define BN_BWD_REVERSE 0
#endif
#ifndef BN_STATS_BLOCK_BYTES
#define BN_STATS_BLOCK_BYTES (64 * 1024 * 1024)
#endif
static int bn_stream_output(const bn_geom *g, int backward) {
    return (double)g->numel * (double)g->esize >=
           (g->planes ? BN_STREAM_MIN_PLANES : backward ? BN_STREAM_MIN_ROWS_BWD : BN_STREAM_MIN_ROWS);
}


/* Small planes (channels-first planes under BN_SMALL_PLANE bytes: 7x7, 14x14) of float32/16/bf16 data
 * take the run schedules below: per-channel quantities expanded over a run of at most BN_RUN values.
 * Per-thread scratch: s1/s2 (double), six float arrays, a byte mask and two staging runs. */
#define BN_SMALL_PLANE 2048
#ifndef BN_RUN
#define BN_RUN 2048
#endif
enum { BN_RUN_SCRATCH = (4 * 8 * BN_RUN + 7 * 4 * BN_RUN + BN_RUN + 2 * 4 * BN_RUN) / 8 + 160 };

static int bn_small_planes(const bn_geom *g, bnorm_dtype dt) {
    return g->planes && dt != BNORM_DTYPE_F64 && (size_t)g->inner * g->esize < BN_SMALL_PLANE && g->inner <= BN_RUN;
}

/* The workspace arena's alignment slack (bn_take below): 8 doubles for each of at most 24 pieces, and
 * a page for each of at most 5 coefficient arrays placed just ahead of the output (bn_take_ahead). */
enum { BN_WS_ALIGN_DOUBLES = 8, BN_WS_TAKES = 24, BN_WS_AHEAD = 5, BN_PAGE = 4096 };

/* Workspace in doubles: per thread 7C (+ the run scratch for small planes), shared 14C, communicator
 * (size + 1) * (HDR + 1 + 2C). Sizes were checked for overflow at plan time (bn_check_channel_sizes). */
static void bn_ws_layout(bnorm_plan *p) {
    const size_t C = (size_t)p->g.C;
    const int cs = p->comm ? p->comm->size : 1;
    const bnorm_dtype dt = p->op == BN_OP_FORWARD ? p->fa.desc.dtype : p->ba.desc.dtype;
    const int run = bn_small_planes(&p->g, dt);
    p->ws_per_thread = 7 * C + (run ? (size_t)BN_RUN_SCRATCH : 0);
    p->ws_fixed = 17 * C + (size_t)(cs + 1) * (BN_COMM_HDR + 1 + 3 * C) + 16 + (run ? 8 : 0) +
                  BN_WS_TAKES * BN_WS_ALIGN_DOUBLES + BN_WS_AHEAD * (BN_PAGE / sizeof(double));
}

/* A bump allocator over the execution's workspace. Every piece starts on a 64-byte line whatever the
 * workspace's own alignment (malloc gives 16 bytes, a caller's may be 8): per-channel coefficient and
 * accumulator arrays that straddle lines cost a second cache access per vector load or store, which on
 * the EPYC about halved the speed of a wide-row inference apply loop out of cache (C = 2048, one thread:
 * 1.54-1.65 against 0.67-0.87 ms; docs/performance.md, "Session 8"). The slack for this, BN_WS_ALIGN_DOUBLES per piece for
 * at most BN_WS_TAKES pieces, is part of ws_fixed. */
typedef struct bn_arena {
    double *base;
    size_t used, takes, ahead;
} bn_arena;

/* n doubles after skipping `skip` bytes (a multiple of 8: the workspace is 8-byte aligned, bn_ws_check). */
static double *bn_take_skip(bn_arena *a, uintptr_t skip, size_t n) {
    a->used += (size_t)(skip / sizeof(double));
    double *p = a->base + a->used;
    a->used += n;
    return p;
}

static double *bn_take(bn_arena *a, size_t n) {
    a->takes++;
    assert(a->takes <= BN_WS_TAKES);
    return bn_take_skip(a, -(uintptr_t)(a->base + a->used) & 63u, n);
}

/* A per-channel coefficient array of the rows apply kernels, number j of those read beside the output
 * out (NULL: none, a plain bn_take).
 * Written through the cache: placed 64 (j + 1) bytes ahead of out's offset in a 4 KiB page, on a line.
 * The kernels load coefficients c..c+15 right after storing the outputs of the previous channels; a
 * load whose address agrees in its low 12 bits with a pending store waits for it (4K aliasing), and
 * with C a multiple of 1024 float32 every row keeps the same offsets. Placed just ahead, the arrays only
 * meet stores that come later in program order.
 * Streamed (stream): the output goes through an aligned staging buffer in chunks that start on the
 * output's 64-byte lines (bn_chunk_len), so the array takes out's offset within a line instead: its
 * vectors then start on lines too. (With the page rule, arrays on lines, streamed NHWC 32x1024x14x14
 * inference was 6-15% slower: with an output 16 bytes past a line, chunks that start on the output's
 * lines read every coefficient vector across two lines.)
 * On the EPYC, bench/ab.c in one process against the session-start library: docs/performance.md. */
static double *bn_take_ahead(bn_arena *a, size_t n, const void *out, int j, int stream) {
    if (!out) return bn_take(a, n);
    const uintptr_t at = (uintptr_t)(a->base + a->used), o = (uintptr_t)out;
    const uintptr_t skip = stream ? ((o & 56u) - at) & 63u /* both 8-byte aligned */
                                  : (((o + 64u * (uintptr_t)(j + 1)) & (uintptr_t)(BN_PAGE - 64)) - at) &
                                        (uintptr_t)(BN_PAGE - 1);
    a->ahead++;
    assert(a->ahead <= BN_WS_AHEAD);
    return bn_take_skip(a, skip, n);
}

/* Contiguous range [lo, hi) of `total` items for logical thread t of nt: floor(total * t / nt),
 * computed without overflow (r * t < nt^2). */
static void bn_range(int64_t total, int t, int nt, int64_t *lo, int64_t *hi) {
    const int64_t q = total / nt, r = total % nt;
    *lo = q * t + r * t / nt;
    *hi = q * (t + 1) + r * (t + 1) / nt;
}

/* Compute-type arrays: float for F32/F16/BF16 data, double for F64. */
static void bn_ka_set(void *arr, int dbl, int64_t i, double v) {
    if (dbl) ((double *)arr)[i] = v;
    else ((float *)arr)[i] = (float)v;
}

/* The mean as hi + lo arrays of the compute type (see kernel_impl.h). */
static void bn_ka_set_mean(void *hi, void *lo, int dbl, int64_t i, double v) {
    if (dbl) {
        ((double *)hi)[i] = v;
        ((double *)lo)[i] = 0;
    } else {
        float h = (float)v;
        ((float *)hi)[i] = h;
        ((float *)lo)[i] = (float)(v - (double)h);
    }
}

/* ------------------------------------------------------------------------------------------- */
/* Forward                                                                                      */
/* ------------------------------------------------------------------------------------------- */

typedef struct bn_fwd_ctx {
    const bnorm_forward_args *a;
    const bn_exec *ex;
    const bn_kernels *k;
    bn_geom g;
    bnorm_dtype pd;
    int dbl;
    int64_t mask_stride;
    int stream; /* write y with streaming stores */
} bn_fwd_ctx;

/* Statistics of channel c are final: write saved/running outputs, return mean and scale/shift. */
static void bn_fwd_finalize_channel(const bn_fwd_ctx *f, int64_t c, double n, double mean, double m2,
                                    double *scale, double *shift) {
    bn_fwd_finalize(f->a, f->pd, c, n, mean, m2, scale, shift);
}

static const char *bn_at(const void *p, int64_t elems, size_t es) {
    return p ? (const char *)p + elems * (int64_t)es : NULL;
}

/* Normalizes plane p into out (y's plane, or a staging buffer), streaming when asked. */
static void bn_fwd_apply_plane_to(const bn_fwd_ctx *f, int64_t p, void *out, int stream, double mean, double scale,
                                  double shift) {
    const bnorm_forward_args *a = f->a;
    int64_t off = p * f->g.inner;
    uint8_t *mask = a->relu_mask ? (uint8_t *)a->relu_mask + p * f->mask_stride : NULL;
    f->k->seg_apply(bn_at(a->x, off, f->g.esize), out, bn_at(a->addend, off, f->g.esize), mask, f->g.inner, mean,
                    scale, shift, a->relu, stream);
}

static void bn_fwd_apply_planes(const bn_fwd_ctx *f, int64_t p, double mean, double scale, double shift) {
    bn_fwd_apply_plane_to(f, p, (char *)f->a->y + p * f->g.inner * (int64_t)f->g.esize, f->stream, mean, scale, shift);
}

/* Channel schedule: a thread owns a contiguous range of channels and walks it in blocks of `cb`
 * channels whose slices (all N planes; x, plus dy for the backward) fit in about half the L2 cache. For
 * each block: statistics of every plane in memory order (n outer, c inner: with small planes that is a
 * contiguous run of cb planes per n, which the hardware prefetcher follows), then the normalization in
 * reverse order, so the planes read last, the ones most surely still cached, are re-read first.
 * Each channel's partials are merged in plane order whatever the block size or thread count, so the
 * results depend on neither. */
enum { BN_BLOCK_MAX = 64 };

#define BN_STAGE_BYTES (16 * 1024)
#define BN_STAGE_PLANE_MAX 2048

static int64_t bn_block_channels(const bn_geom *g, int tensors, int stream) {
    double slice = (double)g->outer * (double)g->inner * (double)g->esize * tensors;
    int64_t cb = (int64_t)((double)bn_tuning_get()->l2_budget / slice);
    cb = cb < 1 ? 1 : cb > BN_BLOCK_MAX ? BN_BLOCK_MAX : cb;
    size_t plane = (size_t)g->inner * g->esize;
    if (stream && plane < BN_STAGE_PLANE_MAX && (size_t)cb * plane > BN_STAGE_BYTES)
        cb = (int64_t)(BN_STAGE_BYTES / plane); /* small planes are staged: a run must fit the buffer */
    return cb;
}

/* Staging of small planes: a run of cb planes of at most BN_STAGE_BYTES, planes below 2 KiB. Returns the
 * bytes of one plane when the channel schedule should stage (0: write planes directly). */
#if defined(__GNUC__)
#define BN_ALIGN64 __attribute__((aligned(64)))
#else
#define BN_ALIGN64
#endif
static size_t bn_stage_plane_bytes(const bn_geom *g, int64_t cb, int stream) {
    size_t plane = (size_t)g->inner * g->esize;
    if (!stream || plane >= BN_STAGE_PLANE_MAX || (size_t)cb * plane > BN_STAGE_BYTES) return 0;
    return plane;
}

/* Pieces of about BN_STREAM_PIECE bytes of output, ending on output lines (simd.h bn_line_piece). */
#define BN_STREAM_PIECE 1024
static int64_t bn_stream_piece(const void *out, size_t es, int64_t left) {
    return bn_line_piece(out, es, left, BN_STREAM_PIECE);
}
#ifndef BN_INTERLEAVE
#define BN_INTERLEAVE 1
#endif

/* Software prefetch of a run of bytes into the cache. The channel schedule reads short runs (a block
 * of planes per n) at a large stride; the hardware prefetchers stop at 4 KiB page boundaries, so
 * the run two steps ahead is requested explicitly. */
static inline void bn_prefetch_run(const void *p, size_t bytes) {
#if defined(__GNUC__)
    const char *c = (const char *)p;
    for (size_t i = 0; i < bytes; i += 64) __builtin_prefetch(c + i, 0, 2);
#else
    (void)p;
    (void)bytes;
#endif
}
#ifndef BN_PREFETCH_AHEAD /* runs prefetched ahead of the statistics pass (compile-time knob) */
#define BN_PREFETCH_AHEAD 2
#endif

#ifndef BN_OVERLAP /* 1: statistics of the next block interleaved with the normalization of this one */
#define BN_OVERLAP 1
#endif

/* Statistics of a channel block in the channel schedule. Float32/16/bf16 data with blocks of at most
 * BN_LANE_BLOCK channels keep lane accumulators per channel (seg_stats_acc, shift = the channel's first
 * value) folded once at the end; float64 data (two passes per plane) and larger blocks merge per-plane
 * moments. Either way the order depends only on the shape, not on the block size or thread count. */
enum { BN_LANE_BLOCK = 32 };
typedef struct bn_block_stats {
    int lanes;                                      /* 1: lane accumulators, 0: per-plane moments */
    bn_moments mo[BN_BLOCK_MAX];
    double k[BN_LANE_BLOCK];
    double acc[BN_LANE_BLOCK][2 * BN_STATS_LANES];
} bn_block_stats;

static void bn_block_stats_begin(const bn_fwd_ctx *f, bn_block_stats *bs, int64_t c0, int64_t nc) {
    const bn_geom *g = &f->g;
    bs->lanes = !f->dbl && nc <= BN_LANE_BLOCK;
    for (int64_t j = 0; j < nc; j++) {
        bs->mo[j].n = bs->mo[j].mean = bs->mo[j].m2 = 0;
        if (!bs->lanes) continue;
        float k0;
        f->k->to_f32(bn_at(f->a->x, (c0 + j) * g->inner, g->esize), &k0, 1);
        bs->k[j] = (double)k0;
        for (int i = 0; i < 2 * BN_STATS_LANES; i++) bs->acc[j][i] = 0;
    }
}

/* Adds the planes of batch index o. */
static void bn_block_stats_add(const bn_fwd_ctx *f, bn_block_stats *bs, int64_t o, int64_t c0, int64_t nc) {
    const bn_geom *g = &f->g;
    for (int64_t j = 0; j < nc; j++) {
        const void *x = bn_at(f->a->x, (o * g->C + c0 + j) * g->inner, g->esize);
        if (bs->lanes) {
            f->k->seg_stats_acc(x, g->inner, bs->k[j], bs->acc[j]);
        } else {
            double mu, m2;
            f->k->seg_stats(x, g->inner, &mu, &m2);
            bn_moments_merge(&bs->mo[j], (double)g->inner, mu, m2);
        }
    }
}

/* Interleaved statistics of the next block (planes of 2 KiB or more): a cursor walks its planes in the
 * order of bn_block_stats_add (o, then j, then the values of the plane) and is advanced between the
 * pieces of this block's normalization, so the reads of the next block from DRAM and the streaming
 * writes of this one alternate every few hundred values instead of every plane (docs/performance.md
 * note 29). Lane accumulators are added in pieces that start on a multiple of BN_STATS_LANES of the
 * plane, so every value lands in the lane it would in one call: results are those of the plain
 * schedule. Per-plane moments (no lanes) advance by whole planes. */
typedef struct bn_stats_cursor {
    int64_t o, j, off;  /* next value: plane (o, c1 + j), offset off */
    int64_t done, total; /* values added, values in the block */
} bn_stats_cursor;

enum { BN_STATS_PIECE = 8 * BN_STATS_LANES };

static void bn_stats_advance(const bn_fwd_ctx *f, bn_block_stats *bs, bn_stats_cursor *cu, int64_t c1, int64_t nc1,
                             int64_t target) {
    const bn_geom *g = &f->g;
    while (cu->done < target && cu->o < g->outer) {
        const int64_t p = cu->o * g->C + c1 + cu->j;
        const char *x = bn_at(f->a->x, p * g->inner + cu->off, g->esize);
        int64_t len = g->inner - cu->off;
        if (bs->lanes) {
            if (len > BN_STATS_PIECE) len = BN_STATS_PIECE;
            if (cu->o + BN_PREFETCH_AHEAD < g->outer)
                bn_prefetch_run(x + BN_PREFETCH_AHEAD * g->C * g->inner * (int64_t)g->esize, (size_t)len * g->esize);
            f->k->seg_stats_acc(x, len, bs->k[cu->j], bs->acc[cu->j]);
        } else {
            double mu, m2;
            f->k->seg_stats(x, len, &mu, &m2);
            bn_moments_merge(&bs->mo[cu->j], (double)len, mu, m2);
        }
        cu->done += len;
        cu->off += len;
        if (cu->off == g->inner) {
            cu->off = 0;
            if (++cu->j == nc1) {
                cu->j = 0;
                cu->o++;
            }
        }
    }
}

/* Final moments in bs->mo. A channel whose lane sums are not finite (Inf or NaN in it, or an
 * overflow) is recomputed plane by plane as float64 data are, so it gets the same results. */
static void bn_block_stats_end(const bn_fwd_ctx *f, bn_block_stats *bs, int64_t c0, int64_t nc) {
    if (!bs->lanes) return;
    const bn_geom *g = &f->g;
    const double n = (double)g->outer * (double)g->inner;
    for (int64_t j = 0; j < nc; j++) {
        double *v1 = bs->acc[j], *v2 = bs->acc[j] + BN_STATS_LANES;
        for (int w = BN_STATS_LANES / 2; w >= 1; w /= 2)
            for (int i = 0; i < w; i++) {
                v1[i] += v1[i + w];
                v2[i] += v2[i + w];
            }
        const double s1 = v1[0], s2 = v2[0];
        bn_moments *m = &bs->mo[j];
        if (isfinite(s1) && isfinite(s2)) {
            m->n = n;
            m->mean = bs->k[j] + s1 / n;
            m->m2 = s2 - s1 * s1 / n;
            if (m->m2 < 0) m->m2 = 0;
        } else {
            m->n = m->mean = m->m2 = 0;
            for (int64_t o = 0; o < g->outer; o++) {
                double mu, m2;
                f->k->seg_stats(bn_at(f->a->x, (o * g->C + c0 + j) * g->inner, g->esize), g->inner, &mu, &m2);
                bn_moments_merge(m, (double)g->inner, mu, m2);
            }
        }
    }
}

/* the environment of bn_fwd_channel_schedule's per-thread task */
typedef struct bn_fwd_channel_schedule_env {
    const bn_fwd_ctx *f;
    int nt;
} bn_fwd_channel_schedule_env;

static void bn_fwd_channel_schedule_task(void *env_, int t) {
    const bn_fwd_channel_schedule_env *e_ = (const bn_fwd_channel_schedule_env *)env_;
    const bn_fwd_ctx *f = e_->f;
    int nt = e_->nt;
    (void)f; (void)nt;
    const bn_geom *g = &f->g;
    const bnorm_forward_args *a = f->a;
    int64_t cb = bn_block_channels(g, 1, f->stream);
    /* With the overlap two blocks share the L2 (the one normalized, the next one read): half size.
     * Only for planes of 2 KiB or more: with small (staged) planes it measured neutral to slower. */
    const int overlap = BN_OVERLAP && (size_t)g->inner * g->esize >= BN_STAGE_PLANE_MAX;
    if (overlap && cb > 1) cb /= 2;
    /* Streaming plane by plane would leave partial cache lines at every plane boundary of small planes
     * (each one a read-modify-write in DRAM); such runs are staged and streamed as one piece. */
    const size_t run_bytes = bn_stage_plane_bytes(g, cb, f->stream);
    {
        BN_ALIGN64 unsigned char stage[BN_STAGE_BYTES];
        bn_block_stats sa, sb, *cur = &sa, *nxt = &sb; /* this block's statistics, the next block's */
        double scale[BN_BLOCK_MAX], shift[BN_BLOCK_MAX];
        int64_t lo, hi;
        int have_next = 0;
        bn_range(g->C, t, nt, &lo, &hi);
        for (int64_t c0 = lo; c0 < hi; c0 += cb) {
            const int64_t nc = hi - c0 < cb ? hi - c0 : cb;
            if (have_next) { /* gathered while the previous block was normalized */
                bn_block_stats *sw = cur;
                cur = nxt;
                nxt = sw;
            } else {
                bn_block_stats_begin(f, cur, c0, nc);
                for (int64_t o = 0; o < g->outer; o++) {
                    if (o + BN_PREFETCH_AHEAD < g->outer)
                        bn_prefetch_run(bn_at(a->x, ((o + BN_PREFETCH_AHEAD) * g->C + c0) * g->inner, g->esize),
                                        (size_t)(nc * g->inner) * g->esize);
                    bn_block_stats_add(f, cur, o, c0, nc);
                }
                bn_block_stats_end(f, cur, c0, nc);
            }
            const bn_moments *mo = cur->mo;
            for (int64_t j = 0; j < nc; j++)
                bn_fwd_finalize_channel(f, c0 + j, mo[j].n, mo[j].mean, mo[j].m2, &scale[j], &shift[j]);
            /* the next block: its statistics are read run by run between this block's runs, in plane
               order (so the merge order, and the results, are those of the plain schedule) */
            const int64_t c1 = c0 + nc, nc1 = hi - c1 < cb ? hi - c1 : cb;
            have_next = overlap && nc1 > 0;
            if (have_next) bn_block_stats_begin(f, nxt, c1, nc1);
            if (have_next && BN_INTERLEAVE) {
                /* this block's planes in pieces of about BN_STREAM_PIECE bytes (ending on output lines),
                   the next block's statistics advanced in proportion after each piece */
                bn_stats_cursor cu = {0, 0, 0, 0, g->outer * nc1 * g->inner};
                const int64_t total = g->outer * nc * g->inner;
                int64_t applied = 0;
                for (int64_t o = g->outer - 1; o >= 0; o--)
                    for (int64_t j = nc - 1; j >= 0; j--) {
                        const int64_t off = (o * g->C + c0 + j) * g->inner;
                        for (int64_t i0 = 0, len; i0 < g->inner; i0 += len) {
                            char *y = (char *)a->y + (off + i0) * (int64_t)g->esize;
                            len = f->stream ? bn_stream_piece(y, g->esize, g->inner - i0) : g->inner - i0;
                            uint8_t *mask = NULL;
                            if (a->relu_mask) { /* a piece's bits start on a byte: pieces of whole bytes */
                                if (i0 + len < g->inner) len -= (i0 + len) % 8;
                                mask = (uint8_t *)a->relu_mask + (o * g->C + c0 + j) * f->mask_stride + (i0 >> 3);
                            }
                            f->k->seg_apply(bn_at(a->x, off + i0, g->esize), y, bn_at(a->addend, off + i0, g->esize), mask,
                                            len, mo[j].mean, scale[j], shift[j], a->relu, f->stream);
                            applied += len;
                            bn_stats_advance(f, nxt, &cu, c1, nc1, (int64_t)((double)applied / (double)total * (double)cu.total));
                        }
                    }
                bn_stats_advance(f, nxt, &cu, c1, nc1, cu.total);
                bn_block_stats_end(f, nxt, c1, nc1);
                continue;
            }
            for (int64_t o = g->outer - 1; o >= 0; o--) {
                const int64_t p0 = o * g->C + c0;
                if (run_bytes) { /* small planes: stage the block's contiguous run, stream it whole */
                    for (int64_t j = nc - 1; j >= 0; j--)
                        bn_fwd_apply_plane_to(f, p0 + j, stage + j * run_bytes, 0, mo[j].mean, scale[j], shift[j]);
                    bn_stream_copy((char *)a->y + p0 * g->inner * (int64_t)g->esize, stage, (size_t)(nc * run_bytes));
                } else {
                    for (int64_t j = nc - 1; j >= 0; j--)
                        bn_fwd_apply_planes(f, p0 + j, mo[j].mean, scale[j], shift[j]);
                }
                if (have_next) {
                    const int64_t o1 = g->outer - 1 - o;
                    if (o1 + BN_PREFETCH_AHEAD < g->outer)
                        bn_prefetch_run(bn_at(a->x, ((o1 + BN_PREFETCH_AHEAD) * g->C + c1) * g->inner, g->esize),
                                        (size_t)(nc1 * g->inner) * g->esize);
                    bn_block_stats_add(f, nxt, o1, c1, nc1);
                }
            }
            if (have_next) bn_block_stats_end(f, nxt, c1, nc1);
        }
        if (f->stream) bn_stream_fence();
    }
}

static void bn_fwd_channel_schedule(const bn_fwd_ctx *f, int nt) {
    bn_fwd_channel_schedule_env env_ = {f, nt};
    bn_exec_run(f->ex, bn_fwd_channel_schedule_task, &env_);
}

/* Per-thread scratch of the run schedules, carved 64-byte aligned out of BN_RUN_SCRATCH doubles. */
typedef struct bn_run_scratch {
    double *s1, *s2;                     /* element-wise sums of a channel block */
    double *n1, *n2;                     /* the next block's (interleaved forward statistics) */
    float *k, *nk, *mh, *ml, *c1, *c2, *c3; /* expanded shift (this block's, the next one's), mean hi/lo
                                               and coefficients */
    uint8_t *m;                          /* expanded mask */
    unsigned char *st1, *st2;            /* staging runs for streaming stores */
} bn_run_scratch;

static void *bn_carve(unsigned char **p, size_t bytes) {
    uintptr_t a = ((uintptr_t)*p + 63) & ~(uintptr_t)63;
    *p = (unsigned char *)a + bytes;
    return (void *)a;
}

static bn_run_scratch bn_run_scratch_at(double *base, int t) {
    unsigned char *p = (unsigned char *)(base + (size_t)t * BN_RUN_SCRATCH);
    bn_run_scratch r;
    r.s1 = bn_carve(&p, 8 * BN_RUN);
    r.s2 = bn_carve(&p, 8 * BN_RUN);
    r.n1 = bn_carve(&p, 8 * BN_RUN);
    r.n2 = bn_carve(&p, 8 * BN_RUN);
    r.k = bn_carve(&p, 4 * BN_RUN);
    r.nk = bn_carve(&p, 4 * BN_RUN);
    r.mh = bn_carve(&p, 4 * BN_RUN);
    r.ml = bn_carve(&p, 4 * BN_RUN);
    r.c1 = bn_carve(&p, 4 * BN_RUN);
    r.c2 = bn_carve(&p, 4 * BN_RUN);
    r.c3 = bn_carve(&p, 4 * BN_RUN);
    r.m = bn_carve(&p, BN_RUN);
    r.st1 = bn_carve(&p, 4 * BN_RUN);
    r.st2 = bn_carve(&p, 4 * BN_RUN);
    return r;
}

/* Logical thread t of nt: its scratch and its share [lo, hi) of the C channels. */
static bn_run_scratch bn_run_thread(double *scratch, int64_t C, int t, int nt, int64_t *lo, int64_t *hi) {
    bn_range(C, t, nt, lo, hi);
    return bn_run_scratch_at(scratch, t);
}

/* Fills v[j * inner + i] = val for i < inner. */
static void bn_expand(float *v, int64_t j, int64_t inner, float val) {
    float *q = v + j * inner;
    for (int64_t i = 0; i < inner; i++) q[i] = val;
}

static void bn_expand_mean(float *mh, float *ml, int64_t j, int64_t inner, double mean) {
    float h = (float)mean;
    bn_expand(mh, j, inner, h);
    bn_expand(ml, j, inner, (float)(mean - (double)h));
}

enum { BN_RUN_BLOCK_MAX = 256 };

/* Channels per block of the run schedules: slices of about half the L2 (tensors: x, plus dy in the
 * backward) and a run (one batch index of the block) of at most BN_RUN values. */
static int64_t bn_run_channels(const bn_geom *g, int tensors) {
    double slice = (double)g->outer * (double)g->inner * (double)g->esize * tensors;
    int64_t cb = (int64_t)((double)bn_tuning_get()->l2_budget / slice), cmax = BN_RUN / g->inner;
    if (cmax > BN_RUN_BLOCK_MAX) cmax = BN_RUN_BLOCK_MAX;
    return cb < 1 ? 1 : cb > cmax ? cmax : cb;
}

/* Starts the statistics of block [c0, c0 + nc): shifts k (each channel's first value) expanded over the
 * run, sums s1, s2 zeroed. */
static void bn_run_stats_begin(const bn_fwd_ctx *f, int64_t c0, int64_t nc, float *k, double *s1, double *s2) {
    const bn_geom *g = &f->g;
    for (int64_t j = 0; j < nc; j++) {
        float k0;
        f->k->to_f32(bn_at(f->a->x, (c0 + j) * g->inner, g->esize), &k0, 1);
        bn_expand(k, j, g->inner, k0);
    }
    for (int64_t i = 0; i < nc * g->inner; i++) s1[i] = s2[i] = 0;
}

/* Interleaved statistics of the next block of the run schedule (as bn_stats_advance for the channel
 * schedule): a cursor over its runs (batch index o, offset off in the run of n values), advanced in
 * pieces of at most BN_STATS_PIECE values up to `target` values. run_stats is element-wise, so the
 * pieces do not change the sums. */
static void bn_run_stats_advance(const bn_fwd_ctx *f, const bn_run_scratch *r, bn_stats_cursor *cu, int64_t c1,
                                 int64_t n, int64_t target) {
    const bn_geom *g = &f->g;
    const size_t es = g->esize;
    while (cu->done < target && cu->o < g->outer) {
        const int64_t len = n - cu->off < BN_STATS_PIECE ? n - cu->off : BN_STATS_PIECE;
        const char *x = bn_at(f->a->x, (cu->o * g->C + c1) * g->inner + cu->off, es);
        if (cu->o + BN_PREFETCH_AHEAD < g->outer)
            bn_prefetch_run(x + BN_PREFETCH_AHEAD * g->C * g->inner * (int64_t)es, (size_t)len * es);
        f->k->run_stats(x, len, r->nk + cu->off, r->n1 + cu->off, r->n2 + cu->off);
        cu->done += len;
        cu->off += len;
        if (cu->off == n) {
            cu->off = 0;
            cu->o++;
        }
    }
}

/* Forward on small planes, channel-owning threads (training without a communicator, or inference):
 * per block of cb channels, the statistics of all planes element by element (run_stats: s1, s2 per
 * position of the run, shifted by each channel's first value; one pass, the argument of kernel_impl.h
 * with n = all values of the channel), then the normalization of every run with expanded
 * coefficients. In training, the next block's statistics are read piece by piece between the pieces
 * of this block's normalization (as in the channel schedule), so DRAM reads and streaming writes
 * overlap; two blocks then share the L2, each half the size. Results do not depend on the block size
 * or the thread count. A channel whose sums are not finite is redone plane by plane (seg_stats, as the
 * plane schedule does). Inference: coefficients from mean/scale/shift (double[C]). */
/* the environment of bn_fwd_run_schedule's per-thread task */
typedef struct bn_fwd_run_schedule_env {
    const bn_fwd_ctx *f;
    int nt;
    double *scratch;
    const double *imean;
    const double *iscale;
    const double *ishift;
} bn_fwd_run_schedule_env;

static void bn_fwd_run_schedule_task(void *env_, int t) {
    const bn_fwd_run_schedule_env *e_ = (const bn_fwd_run_schedule_env *)env_;
    const bn_fwd_ctx *f = e_->f;
    int nt = e_->nt;
    double *scratch = e_->scratch;
    const double *imean = e_->imean;
    const double *iscale = e_->iscale;
    const double *ishift = e_->ishift;
    (void)f; (void)nt; (void)scratch; (void)imean; (void)iscale; (void)ishift;
    const bn_geom *g = &f->g;
    const bnorm_forward_args *a = f->a;
    const int64_t inner = g->inner, C = g->C;
    const size_t es = g->esize;
    int64_t cb = bn_run_channels(g, 1);
    /* with the overlap two blocks share the L2: half size, unless that cuts a run below 2 KiB (7x7
       planes of a large batch), where the shorter strided runs cost more than the overlap gains */
    const int overlap = BN_INTERLEAVE && !imean && cb > 1 && (size_t)(cb / 2 * inner) * es >= 2048;
    if (overlap) cb /= 2;
    {
        int64_t lo, hi;
        bn_run_scratch r = bn_run_thread(scratch, C, t, nt, &lo, &hi);
        int have_next = 0;
        for (int64_t c0 = lo; c0 < hi; c0 += cb) {
            const int64_t nc = hi - c0 < cb ? hi - c0 : cb, n = nc * inner;
            if (have_next) { /* gathered while the previous block was normalized */
                double *t1 = r.s1, *t2 = r.s2;
                float *tk = r.k;
                r.s1 = r.n1, r.s2 = r.n2, r.k = r.nk;
                r.n1 = t1, r.n2 = t2, r.nk = tk;
            } else if (!imean) {
                bn_run_stats_begin(f, c0, nc, r.k, r.s1, r.s2);
                for (int64_t o = 0; o < g->outer; o++) {
                    if (o + BN_PREFETCH_AHEAD < g->outer)
                        bn_prefetch_run(bn_at(a->x, ((o + BN_PREFETCH_AHEAD) * C + c0) * inner, es), (size_t)n * es);
                    f->k->run_stats(bn_at(a->x, (o * C + c0) * inner, es), n, r.k, r.s1, r.s2);
                }
            }
            for (int64_t j = 0; j < nc; j++) {
                double mean, scale, shift;
                if (imean) {
                    mean = imean[c0 + j];
                    scale = iscale[c0 + j];
                    shift = ishift[c0 + j];
                } else {
                    double s1 = 0, s2 = 0, m = (double)g->m;
                    for (int64_t i = 0; i < inner; i++) {
                        s1 += r.s1[j * inner + i];
                        s2 += r.s2[j * inner + i];
                    }
                    double m2;
                    if (isfinite(s1) && isfinite(s2) && isfinite(r.k[j * inner])) {
                        mean = (double)r.k[j * inner] + s1 / m;
                        m2 = s2 - s1 * s1 / m;
                        if (m2 < 0) m2 = 0;
                    } else { /* Inf/NaN in the channel (or an overflow): plane by plane */
                        bn_moments mo = {0, 0, 0};
                        for (int64_t o = 0; o < g->outer; o++) {
                            double mu, pm2;
                            f->k->seg_stats(bn_at(a->x, (o * C + c0 + j) * inner, es), inner, &mu, &pm2);
                            bn_moments_merge(&mo, (double)inner, mu, pm2);
                        }
                        mean = mo.mean;
                        m2 = mo.m2;
                    }
                    bn_fwd_finalize_channel(f, c0 + j, m, mean, m2, &scale, &shift);
                }
                bn_expand_mean(r.mh, r.ml, j, inner, mean);
                bn_expand(r.c1, j, inner, (float)scale);
                bn_expand(r.c2, j, inner, (float)shift);
            }
            const int64_t c1 = c0 + nc, nc1 = hi - c1 < cb ? hi - c1 : cb, n1 = nc1 * inner;
            have_next = overlap && nc1 > 0;
            bn_stats_cursor cu = {0, 0, 0, 0, g->outer * n1};
            if (have_next) bn_run_stats_begin(f, c1, nc1, r.nk, r.n1, r.n2);
            /* training: reverse order, the runs read last by the statistics are still in cache;
               inference: memory order, the runs ahead prefetched (they come from DRAM) */
            for (int64_t q = 0; q < g->outer; q++) {
                const int64_t o = imean ? q : g->outer - 1 - q, off = (o * C + c0) * inner;
                if (imean && q + BN_PREFETCH_AHEAD < g->outer)
                    bn_prefetch_run(bn_at(a->x, off + BN_PREFETCH_AHEAD * C * inner, es), (size_t)n * es);
                uint8_t *mask = a->relu_mask ? (uint8_t *)a->relu_mask + (o * C + c0) * f->mask_stride : NULL;
                char *y = (char *)a->y + off * (int64_t)es;
                if (f->stream && !mask) { /* line-aligned pieces, the next block's statistics between them */
                    for (int64_t i0 = 0, len; i0 < n; i0 += len) {
                        len = bn_stream_piece(y + i0 * (int64_t)es, es, n - i0);
                        f->k->run_apply(bn_at(a->x, off + i0, es), r.st1, bn_at(a->addend, off + i0, es), NULL, 0, 1, len,
                                        r.mh + i0, r.ml + i0, r.c1 + i0, r.c2 + i0, a->relu);
                        bn_stream_copy(y + i0 * (int64_t)es, r.st1, (size_t)len * es);
                        if (have_next)
                            bn_run_stats_advance(f, &r, &cu, c1, n1,
                                                 (int64_t)((double)(q * n + i0 + len) / (double)(g->outer * n) * (double)cu.total));
                    }
                    continue;
                }
                f->k->run_apply(bn_at(a->x, off, es), f->stream ? (void *)r.st1 : (void *)y, bn_at(a->addend, off, es), mask,
                                f->mask_stride, nc, inner, r.mh, r.ml, r.c1, r.c2, a->relu);
                if (f->stream) bn_stream_copy(y, r.st1, (size_t)n * es);
                if (have_next)
                    bn_run_stats_advance(f, &r, &cu, c1, n1, (int64_t)((double)(q + 1) / (double)g->outer * (double)cu.total));
            }
            if (have_next) bn_run_stats_advance(f, &r, &cu, c1, n1, cu.total);
        }
        if (f->stream) bn_stream_fence();
    }
}

static void bn_fwd_run_schedule(const bn_fwd_ctx *f, int nt, double *scratch, const double *imean,
                                 const double *iscale, const double *ishift) {
    bn_fwd_run_schedule_env env_ = {f, nt, scratch, imean, iscale, ishift};
    bn_exec_run(f->ex, bn_fwd_run_schedule_task, &env_);
}

/* Phase 1 of the split schedule: per-thread partial moments, merged in thread order into
 * (gn, gmean[C], gm2[C]). Per-thread space: 7C doubles at part. */
/* the environment of bn_fwd_partials's per-thread task */
typedef struct bn_fwd_partials_env {
    const bn_fwd_ctx *f;
    int nt;
    double *part;
    double *gn;
    double *gmean;
    double *gm2;
} bn_fwd_partials_env;

static void bn_fwd_partials_task(void *env_, int t) {
    const bn_fwd_partials_env *e_ = (const bn_fwd_partials_env *)env_;
    const bn_fwd_ctx *f = e_->f;
    int nt = e_->nt;
    double *part = e_->part;
    double *gn = e_->gn;
    double *gmean = e_->gmean;
    double *gm2 = e_->gm2;
    (void)f; (void)nt; (void)part; (void)gn; (void)gmean; (void)gm2;
    const bn_geom *g = &f->g;
    const int64_t C = g->C;
    const char *x = (const char *)f->a->x;
    {
        double *pn = part + (size_t)t * 7 * C, *pmean = pn + C, *pm2 = pmean + C;
        for (int64_t c = 0; c < C; c++) pn[c] = pmean[c] = pm2[c] = 0;
        int64_t lo, hi;
        if (g->planes) {
            bn_range(g->outer * C, t, nt, &lo, &hi);
            for (int64_t p = lo; p < hi; p++) {
                int64_t c = p % C;
                double mu, m2;
                f->k->seg_stats(x + p * g->inner * (int64_t)g->esize, g->inner, &mu, &m2);
                bn_moments mo = {pn[c], pmean[c], pm2[c]};
                bn_moments_merge(&mo, (double)g->inner, mu, m2);
                pn[c] = mo.n; pmean[c] = mo.mean; pm2[c] = mo.m2;
            }
        } else {
            double *sum = pm2 + C, *s1 = sum + C, *s2 = s1 + C;
            void *ref = s2 + C; /* C values of the compute type */
            /* One shifted pass per block (the shift: the block's first row); float64 data and blocks
               with Inf/NaN take two passes. Float64 blocks are half the L2, so the second pass reads
               from L2; the one-pass blocks are BN_STATS_BLOCK_BYTES (64 MiB: in practice the thread's
               whole range), because the merge of a block into the partials costs a division per
               channel: with 512 KiB blocks and C = 2048 it was a third of the statistics pass on the
               EPYC (32x2048x7x7 NHWC training forward 0.78 -> 0.57 ms). */
            int64_t blk = (int64_t)((f->dbl ? (double)bn_tuning_get()->l2_budget : (double)BN_STATS_BLOCK_BYTES) /
                                    ((double)C * (double)g->esize));
            if (blk < 1) blk = 1;
            bn_range(g->outer, t, nt, &lo, &hi);
            for (int64_t r0 = lo; r0 < hi; r0 += blk) {
                int64_t rows = hi - r0 < blk ? hi - r0 : blk;
                const char *xb = x + r0 * C * (int64_t)g->esize;
                for (int64_t c = 0; c < C; c++) sum[c] = s1[c] = s2[c] = 0;
                int two_pass = f->dbl;
                if (!two_pass) { /* one pass shifted by the block's first row (kernel_impl.h) */
                    f->k->to_f32(xb, (float *)ref, C);
                    f->k->rows_stats(xb, rows, C, ref, s1, s2);
                    for (int64_t c = 0; c < C && !two_pass; c++) two_pass = !isfinite(s1[c]) || !isfinite(s2[c]);
                    if (two_pass)
                        for (int64_t c = 0; c < C; c++) s1[c] = s2[c] = 0;
                }
                if (two_pass) { /* float64 data, or an Inf/NaN in the block: the two-pass path */
                    f->k->rows_sum(xb, rows, C, sum);
                    for (int64_t c = 0; c < C; c++) bn_ka_set(ref, f->dbl, c, sum[c] / (double)rows);
                    f->k->rows_dev(xb, rows, C, ref, s1, s2);
                }
                for (int64_t c = 0; c < C; c++) {
                    double r = f->dbl ? ((double *)ref)[c] : (double)((float *)ref)[c];
                    double bm = __builtin_isfinite(r) ? r + s1[c] / (double)rows : r, bm2 = s2[c] - s1[c] * s1[c] / (double)rows;
                    bn_moments mo = {pn[c], pmean[c], pm2[c]};
                    bn_moments_merge(&mo, (double)rows, bm, bm2 < 0 ? 0 : bm2);
                    pn[c] = mo.n; pmean[c] = mo.mean; pm2[c] = mo.m2;
                }
            }
        }
    }
}

static void bn_fwd_partials(const bn_fwd_ctx *f, int nt, double *part, double *gn, double *gmean,
                            double *gm2) {
    const bn_geom *g = &f->g;
    const int64_t C = g->C;
    bn_fwd_partials_env env_ = {f, nt, part, gn, gmean, gm2};
    bn_exec_run(f->ex, bn_fwd_partials_task, &env_);
    for (int64_t c = 0; c < C; c++) {
        bn_moments mo = {0, 0, 0};
        for (int t = 0; t < nt; t++) {
            const double *pn = part + (size_t)t * 7 * C;
            bn_moments_merge(&mo, pn[c], pn[C + c], pn[2 * C + c]);
        }
        gn[c] = mo.n; gmean[c] = mo.mean; gm2[c] = mo.m2;
    }
}

/* Phase 2 of the split schedule, and inference. coef: mean, scale, shift as double[C] (masked planes)
 * and as compute-type arrays ka_mean/ka_mlo/ka_scale/ka_shift (rows, and planes without a mask). */
/* the environment of bn_fwd_apply_split's per-thread task */
typedef struct bn_fwd_apply_split_env {
    const bn_fwd_ctx *f;
    int nt;
    const double *mean;
    const double *scale;
    const double *shift;
    const void *ka_mean;
    const void *ka_mlo;
    const void *ka_scale;
    const void *ka_shift;
} bn_fwd_apply_split_env;

static void bn_fwd_apply_split_task(void *env_, int t) {
    const bn_fwd_apply_split_env *e_ = (const bn_fwd_apply_split_env *)env_;
    const bn_fwd_ctx *f = e_->f;
    int nt = e_->nt;
    const double *mean = e_->mean;
    const double *scale = e_->scale;
    const double *shift = e_->shift;
    const void *ka_mean = e_->ka_mean;
    const void *ka_mlo = e_->ka_mlo;
    const void *ka_scale = e_->ka_scale;
    const void *ka_shift = e_->ka_shift;
    (void)f; (void)nt; (void)mean; (void)scale; (void)shift; (void)ka_mean; (void)ka_mlo; (void)ka_scale; (void)ka_shift;
    const bn_geom *g = &f->g;
    const bnorm_forward_args *a = f->a;
    const int64_t C = g->C;
    {
        int64_t lo, hi;
        if (g->planes) {
            bn_range(g->outer * C, t, nt, &lo, &hi);
            const size_t pb = bn_stage_plane_bytes(g, 1, f->stream);
            if (!a->relu_mask) { /* the thread's planes as one flat range (planes_apply) */
                if (hi > lo)
                    f->k->planes_apply(bn_at(a->x, lo * g->inner, g->esize), (char *)a->y + lo * g->inner * (int64_t)g->esize,
                                       bn_at(a->addend, lo * g->inner, g->esize), hi - lo, g->inner, C, lo % C,
                                       ka_mean, ka_mlo, ka_scale, ka_shift, a->relu, f->stream);
            } else if (pb) { /* small planes: consecutive planes are staged and streamed as one run */
                BN_ALIGN64 unsigned char stage[BN_STAGE_BYTES];
                const int64_t k = (int64_t)(BN_STAGE_BYTES / pb);
                for (int64_t p0 = lo; p0 < hi; p0 += k) {
                    const int64_t np = hi - p0 < k ? hi - p0 : k;
                    for (int64_t j = 0; j < np; j++) {
                        int64_t c = (p0 + j) % C;
                        bn_fwd_apply_plane_to(f, p0 + j, stage + j * pb, 0, mean[c], scale[c], shift[c]);
                    }
                    bn_stream_copy((char *)a->y + p0 * (int64_t)pb, stage, (size_t)np * pb);
                }
            } else {
                for (int64_t p = lo; p < hi; p++) {
                    int64_t c = p % C;
                    bn_fwd_apply_planes(f, p, mean[c], scale[c], shift[c]);
                }
            }
        } else {
            bn_range(g->outer, t, nt, &lo, &hi);
            if (hi <= lo) return;
            /* after the statistics pass (training), the rows read last are still in this core's caches:
               apply in pieces of about 64 KiB from the end of the range back, where the CPU's rule says
               so (tuning.c: Intel; on AMD front to back measured as fast or faster) */
            int64_t piece = a->training && bn_tuning_get()->apply_back_to_front
                                ? (int64_t)(bn_tuning_get()->apply_piece_bytes / ((size_t)C * g->esize))
                                : hi - lo;
            if (piece < 1) piece = 1;
            for (int64_t r1 = hi; r1 > lo;) {
                const int64_t r0 = r1 - piece > lo ? r1 - piece : lo, off = r0 * C;
                uint8_t *mask = a->relu_mask ? (uint8_t *)a->relu_mask + r0 * f->mask_stride : NULL;
                f->k->rows_apply(bn_at(a->x, off, g->esize), (char *)a->y + off * (int64_t)g->esize,
                                 bn_at(a->addend, off, g->esize), mask, f->mask_stride, r1 - r0, C, ka_mean,
                                 ka_mlo, ka_scale, ka_shift, a->relu, f->stream);
                r1 = r0;
            }
        }
        if (f->stream) bn_stream_fence();
    }
}

static void bn_fwd_apply_split(const bn_fwd_ctx *f, int nt, const double *mean, const double *scale,
                               const double *shift, const void *ka_mean, const void *ka_mlo,
                               const void *ka_scale, const void *ka_shift) {
    bn_fwd_apply_split_env env_ = {f, nt, mean, scale, shift, ka_mean, ka_mlo, ka_scale, ka_shift};
    bn_exec_run(f->ex, bn_fwd_apply_split_task, &env_);
}

/* Schedules, chosen at plan time. */
enum {
    BN_SCHED_EMPTY = 0,  /* nothing to compute or write */
    BN_SCHED_INFER_RUN,  /* inference with a mask on small planes: the run schedule */
    BN_SCHED_INFER_FLAT, /* inference: one flat walk per thread */
    BN_SCHED_RUN,        /* training, small planes, channel-owning threads */
    BN_SCHED_CHANNEL,    /* training, planes, channel-owning threads */
    BN_SCHED_SPLIT       /* statistics per thread range, merged, then applied (rows, communicator) */
};
static const char *const bn_sched_names[] = {"empty", "inference-run", "inference-flat", "run", "channel", "split"};

static void bn_plan_set(bnorm_plan *p, int sched) {
    p->sched = sched;
    p->sched_name = bn_sched_names[sched];
}

void bn_cpu_plan_detail(const bnorm_plan *p, char *buf, size_t cap) {
    const bn_tuning *tu = bn_tuning_get();
    const bn_geom *g = &p->g;
    if (!g->planes)
        snprintf(buf, cap, "walk=%s,tuning=%s", (size_t)g->C * g->esize <= tu->row_walk_max_bytes ? "rows" : "blocks",
                 tu->text);
    else
        snprintf(buf, cap, "tuning=%s", tu->text);
}

void bn_cpu_plan_forward(bnorm_plan *p) {
    const bnorm_forward_args *a = &p->fa;
    const bn_geom *g = &p->g;
    const int nt = p->ex.nt;
    p->isa = bnorm_get_isa();
    p->k = bn_kernels_variant(p->isa, a->desc.dtype);
    bn_ws_layout(p);
    if (!a->training) {
        if (g->numel == 0) bn_plan_set(p, BN_SCHED_EMPTY);
        else if (a->relu_mask && bn_small_planes(g, a->desc.dtype) && g->C >= nt) bn_plan_set(p, BN_SCHED_INFER_RUN);
        else bn_plan_set(p, BN_SCHED_INFER_FLAT);
    } else if (p->comm) {
        bn_plan_set(p, BN_SCHED_SPLIT);
    } else if (g->m == 0) {
        bn_plan_set(p, BN_SCHED_EMPTY);
    } else if (g->planes && g->C >= nt && bn_small_planes(g, a->desc.dtype)) {
        bn_plan_set(p, BN_SCHED_RUN);
    } else if (g->planes && g->C >= nt) {
        bn_plan_set(p, BN_SCHED_CHANNEL);
    } else {
        bn_plan_set(p, BN_SCHED_SPLIT);
    }
}

static void bn_fwd_ctx_init(bn_fwd_ctx *f, const bnorm_plan *p, const bnorm_forward_args *a) {
    f->a = a;
    f->ex = &p->ex;
    f->k = p->k;
    f->g = p->g;
    f->pd = p->pd;
    f->dbl = a->desc.dtype == BNORM_DTYPE_F64;
    f->mask_stride = bn_mask_stride(&f->g);
    f->stream = bn_stream_output(&f->g, 0);
    /* inference on planes: one flat walk, no re-read of x; whether streaming its output pays is the
       CPU's (tuning.c) */
    if (f->g.planes && p->sched == BN_SCHED_INFER_FLAT && !bn_tuning_get()->stream_planes_inference) f->stream = 0;
}

bnorm_status bn_cpu_forward(const bnorm_plan *p, const bnorm_forward_args *a, double *ws) {
    static const char *F = "bnorm_forward";
    bn_fwd_ctx f;
    bn_fwd_ctx_init(&f, p, a);
    const bn_geom *g = &f.g;
    const int64_t C = g->C;
    const int nt = p->ex.nt;
    const bnorm_comm *comm = p->comm;
    bn_arena ar = {ws, 0, 0, 0};

    switch (p->sched) {
    case BN_SCHED_EMPTY: return BNORM_STATUS_OK; /* empty batch: nothing to compute or update */
    case BN_SCHED_RUN: bn_fwd_run_schedule(&f, nt, bn_take(&ar, (size_t)nt * BN_RUN_SCRATCH), NULL, NULL, NULL); return BNORM_STATUS_OK;
    case BN_SCHED_CHANNEL: bn_fwd_channel_schedule(&f, nt); return BNORM_STATUS_OK;
    case BN_SCHED_INFER_RUN:
    case BN_SCHED_INFER_FLAT: { /* inference: coefficients from the running statistics */
        double *mean = bn_take(&ar, C), *scale = bn_take(&ar, C), *shift = bn_take(&ar, C);
        double *km = bn_take_ahead(&ar, C, a->y, 0, f.stream), *kml = bn_take_ahead(&ar, C, a->y, 1, f.stream);
        double *ks = bn_take_ahead(&ar, C, a->y, 2, f.stream), *kb = bn_take_ahead(&ar, C, a->y, 3, f.stream);
        for (int64_t c = 0; c < C; c++) {
            mean[c] = bn_param_get(a->running_mean, f.pd, c);
            double w = a->weight ? bn_param_get(a->weight, f.pd, c) : 1.0;
            scale[c] = w * bn_invstd(bn_param_get(a->running_var, f.pd, c), a->eps);
            shift[c] = a->bias ? bn_param_get(a->bias, f.pd, c) : 0.0;
            bn_ka_set_mean(km, kml, f.dbl, c, mean[c]);
            bn_ka_set(ks, f.dbl, c, scale[c]);
            bn_ka_set(kb, f.dbl, c, shift[c]);
        }
        /* planes without a mask: one flat walk per thread (apply_split); with a mask, small planes
           take the run schedule (its bits start on a byte per plane) */
        if (p->sched == BN_SCHED_INFER_RUN)
            bn_fwd_run_schedule(&f, nt, bn_take(&ar, (size_t)nt * BN_RUN_SCRATCH), mean, scale, shift);
        else
            bn_fwd_apply_split(&f, nt, mean, scale, shift, km, kml, ks, kb);
        return BNORM_STATUS_OK;
    }
    default: break;
    }

    double *part = bn_take(&ar, (size_t)nt * 7 * C);
    double *gn = bn_take(&ar, C), *gmean = bn_take(&ar, C), *gm2 = bn_take(&ar, C);
    double *scale = bn_take(&ar, C), *shift = bn_take(&ar, C);
    double *km = bn_take_ahead(&ar, C, a->y, 0, f.stream), *kml = bn_take_ahead(&ar, C, a->y, 1, f.stream);
    double *ks = bn_take_ahead(&ar, C, a->y, 2, f.stream), *kb = bn_take_ahead(&ar, C, a->y, 3, f.stream);
    if (g->m > 0) {
        bn_fwd_partials(&f, nt, part, gn, gmean, gm2);
    } else {
        for (int64_t c = 0; c < C; c++) gn[c] = gmean[c] = gm2[c] = 0;
    }
    double n_total = (double)g->m;
    if (comm) {
        /* the same size as the backward's payload (its third block unused here), so that ranks running
           different operations are told apart by the header in one-collective mode */
        size_t cnt = BN_COMM_HDR + 1 + 3 * (size_t)C;
        double *send = bn_take(&ar, cnt), *recv = bn_take(&ar, cnt * (size_t)comm->size);
        bn_comm_header(send, BN_OP_FORWARD, &a->desc, (a->relu ? 1 : 0) | (a->running_mean ? 4 : 0));
        send[BN_COMM_HDR] = (double)g->m;
        for (int64_t c = 0; c < C; c++) {
            send[BN_COMM_HDR + 1 + c] = gmean[c];
            send[BN_COMM_HDR + 1 + C + c] = gm2[c];
            send[BN_COMM_HDR + 1 + 2 * C + c] = 0;
        }
        bnorm_status st = bn_comm_exchange(F, comm, send, cnt, recv);
        if (st) return st;
        n_total = 0;
        for (int r = 0; r < comm->size; r++) n_total += recv[(size_t)r * cnt + BN_COMM_HDR];
        for (int64_t c = 0; c < C; c++) {
            bn_moments mo = {0, 0, 0};
            for (int r = 0; r < comm->size; r++) {
                const double *q = recv + (size_t)r * cnt;
                bn_moments_merge(&mo, q[BN_COMM_HDR], q[BN_COMM_HDR + 1 + c], q[BN_COMM_HDR + 1 + C + c]);
            }
            gn[c] = mo.n; gmean[c] = mo.mean; gm2[c] = mo.m2;
        }
        if (n_total == 0) return BNORM_STATUS_OK;
        if (n_total == 1)
            return bn_fail(BNORM_STATUS_BATCH_TOO_SMALL, F,
                           "expected more than 1 value per channel when training, got 1 value per channel "
                           "over all %d ranks of the group", comm->size);
    }
    for (int64_t c = 0; c < C; c++) {
        bn_fwd_finalize_channel(&f, c, n_total, gmean[c], gm2[c], &scale[c], &shift[c]);
        bn_ka_set_mean(km, kml, f.dbl, c, gmean[c]);
        bn_ka_set(ks, f.dbl, c, scale[c]);
        bn_ka_set(kb, f.dbl, c, shift[c]);
    }
    if (g->m > 0) bn_fwd_apply_split(&f, nt, gmean, scale, shift, km, kml, ks, kb);
    return BNORM_STATUS_OK;
}

/* ------------------------------------------------------------------------------------------- */
/* Backward                                                                                     */
/* ------------------------------------------------------------------------------------------- */

typedef struct bn_bwd_ctx {
    const bnorm_backward_args *a;
    const bn_exec *ex;
    const bn_kernels *k;
    bn_geom g;
    bnorm_dtype pd;
    int dbl;
    int64_t mask_stride;
    int stream;     /* write dx/daddend with streaming stores */
    double n_total; /* global count */
    /* x as the apply kernels read it: NULL with global statistics, where dx = g * k1 does not depend
       on x (k2 = k3 = 0), so the apply reads dy only */
    const void *ax;
    /* float64 training backward: delta[c], what the saved double mean's rounding dropped (the mean's
       residual sum (x - mean) / m, measured in a pre-pass); NULL otherwise */
    const double *delta;
    /* rows with a ReLU mask and an output: the masked gradient g = mask ? dy : 0 is written once into
       this buffer (daddend, whose value it is, or else dx, which the apply then overwrites in place),
       and the sums and the apply read it unmasked; NULL otherwise (bn_bwd_masked_rows) */
    void *gbuf;
} bn_bwd_ctx;

/* Rows with a ReLU mask (the fused add + ReLU backward, channels-last and (N,C)): the masked kernels
 * convert the mask bits row by row, which for narrow rows cost more than the data (NHWC 64x32x32x32,
 * 2 threads: fused backward 3.2 ms against 0.38 ms without the mask). Instead the thread writes g =
 * mask ? dy : 0 for a piece of its rows (one flat masked copy when the rows' bits are contiguous, C a
 * multiple of 8), then runs the unmasked sums on it while it is cached, and the apply reads g as dy.
 * g goes to daddend, whose value it is; without daddend to dx, which the apply overwrites in place
 * (the element-wise kernels read each value before writing it). The values of g, dx and daddend are
 * the masked kernels'; the sums add in the unmasked walk's order. */
static void *bn_bwd_masked_rows(const bnorm_backward_args *a, const bn_geom *g, const bnorm_comm *comm) {
    /* with a communicator the sums come before the collective, which may still fail, and a failed call
       writes nothing (docs/design.md): the synchronized backward keeps the masked kernels */
    if (g->planes || !a->relu_mask || comm) return NULL;
    return a->daddend ? a->daddend : a->dx;
}

/* Writes g = mask ? dy : 0 for rows [r0, r0 + nr) into b->gbuf. */
static void bn_bwd_write_g(const bn_bwd_ctx *b, int64_t r0, int64_t nr, const void *km, const void *kml) {
    const bnorm_backward_args *a = b->a;
    const int64_t C = b->g.C, off = r0 * C;
    const size_t es = b->g.esize;
    const uint8_t *mask = (const uint8_t *)a->relu_mask + r0 * b->mask_stride;
    void *gout = (char *)b->gbuf + off * (int64_t)es;
    if (C % 8 == 0) /* the rows' bits are contiguous: one flat masked copy */
        b->k->mask_copy(bn_at(a->dy, off, es), mask, nr * C, gout);
    else
        /* daddend only: the coefficients are not read (any valid arrays) */
        b->k->rows_bwd_apply(NULL, bn_at(a->dy, off, es), mask, b->mask_stride, NULL, gout, nr, C, km, kml, km, km,
                             km, 0);
}

static double bn_bwd_mean(const bn_bwd_ctx *b, int64_t c) { return bn_bwd_mean_of(b->a, b->pd, c); }
static double bn_bwd_invstd(const bn_bwd_ctx *b, int64_t c) { return bn_bwd_invstd_of(b->a, b->pd, c); }
/* With delta (float64), the kernels' sums and dx use the rounded mean: sum g (x - mean - delta) =
 * sgx - delta * sg, and dx = g k1 - k2 - (x - mean - delta) k3 = g k1 - (k2 - delta k3) - (x - mean) k3. */
static void bn_bwd_param_grads(const bn_bwd_ctx *b, int64_t c, double sg, double sgx, double invstd) {
    bn_bwd_param_grads_of(b->a, b->pd, c, sg, b->delta ? sgx - b->delta[c] * sg : sgx, invstd);
}
static void bn_bwd_coefs(const bn_bwd_ctx *b, int64_t c, double sg, double sgx, double invstd, double *k1,
                         double *k2, double *k3) {
    bn_bwd_coefs_of(b->a, b->pd, c, b->n_total, sg, b->delta ? sgx - b->delta[c] * sg : sgx, invstd, k1, k2, k3);
    if (b->delta) *k2 -= b->delta[c] * *k3;
}

/* float64 pre-pass: per-thread sums of (x - mean) per channel (rows_dev against the saved mean; x - mean
 * is exact where x is within a factor 2 of the mean), merged in thread order into sd. */
typedef struct bn_resid_env {
    const bn_bwd_ctx *b;
    int nt;
    double *part;
    const double *ref;
} bn_resid_env;

static void bn_bwd_resid_task(void *env_, int t) {
    const bn_resid_env *e = (const bn_resid_env *)env_;
    const bn_bwd_ctx *b = e->b;
    const bn_geom *g = &b->g;
    const int64_t C = g->C;
    const char *x = (const char *)b->a->x;
    double *s1 = e->part + (size_t)t * 2 * C, *s2 = s1 + C;
    for (int64_t c = 0; c < C; c++) s1[c] = s2[c] = 0;
    int64_t lo, hi;
    if (g->planes) {
        bn_range(g->outer * C, t, e->nt, &lo, &hi);
        for (int64_t p = lo; p < hi; p++) {
            const int64_t c = p % C;
            b->k->rows_dev(x + p * g->inner * (int64_t)g->esize, g->inner, 1, &e->ref[c], &s1[c], &s2[c]);
        }
    } else {
        bn_range(g->outer, t, e->nt, &lo, &hi);
        for (int64_t r0 = lo; r0 < hi; r0 += 1024) {
            const int64_t rows = hi - r0 < 1024 ? hi - r0 : 1024;
            b->k->rows_dev(x + r0 * C * (int64_t)g->esize, rows, C, e->ref, s1, s2);
        }
    }
}

static void bn_bwd_residual_sums(const bn_bwd_ctx *b, int nt, double *part, double *ref, double *sd) {
    const int64_t C = b->g.C;
    for (int64_t c = 0; c < C; c++) ref[c] = bn_bwd_mean(b, c);
    bn_resid_env env = {b, nt, part, ref};
    bn_exec_run(b->ex, bn_bwd_resid_task, &env);
    for (int64_t c = 0; c < C; c++) {
        double s = 0;
        for (int t = 0; t < nt; t++) s += part[(size_t)t * 2 * C + c];
        sd[c] = s;
    }
}

static void bn_bwd_apply_plane_to(const bn_bwd_ctx *b, int64_t p, void *dx, void *dadd, int stream, double mean,
                                  double k1, double k2, double k3) {
    const bnorm_backward_args *a = b->a;
    int64_t off = p * b->g.inner;
    size_t es = b->g.esize;
    const uint8_t *mask = a->relu_mask ? (const uint8_t *)a->relu_mask + p * b->mask_stride : NULL;
    b->k->seg_bwd_apply(bn_at(b->ax, off, es), bn_at(a->dy, off, es), mask, dx, dadd, b->g.inner, mean, k1, k2, k3,
                        stream);
}

static void bn_bwd_apply_plane(const bn_bwd_ctx *b, int64_t p, double mean, double k1, double k2, double k3) {
    const bnorm_backward_args *a = b->a;
    int64_t off = p * b->g.inner * (int64_t)b->g.esize;
    bn_bwd_apply_plane_to(b, p, a->dx ? (char *)a->dx + off : NULL, a->daddend ? (char *)a->daddend + off : NULL,
                          b->stream, mean, k1, k2, k3);
}

/* One block of channels [c0, c0 + nc) of the channel schedule with global statistics: dx = g * k1 does
 * not depend on the sums, so each plane's sums and its dx are computed together in one sweep (the
 * plane is read from DRAM once, and dy again from the cache), in the order of the two-sweep schedule's
 * sums. */
static void bn_bwd_eval_block(const bn_bwd_ctx *b, int64_t c0, int64_t nc, int need_sums, unsigned char *sdx,
                              unsigned char *sda, size_t run_bytes) {
    const bn_geom *g = &b->g;
    const bnorm_backward_args *a = b->a;
    const int write = a->dx || a->daddend;
    double mean[BN_BLOCK_MAX], invstd[BN_BLOCK_MAX], k1[BN_BLOCK_MAX], k2[BN_BLOCK_MAX], k3[BN_BLOCK_MAX];
    double sg[BN_BLOCK_MAX], sgx[BN_BLOCK_MAX];
    for (int64_t j = 0; j < nc; j++) {
        mean[j] = bn_bwd_mean(b, c0 + j);
        invstd[j] = bn_bwd_invstd(b, c0 + j);
        sg[j] = sgx[j] = 0;
        bn_bwd_coefs(b, c0 + j, 0, 0, invstd[j], &k1[j], &k2[j], &k3[j]);
    }
    const size_t blk = (size_t)(nc * g->inner) * g->esize;
    for (int64_t o = 0; o < g->outer; o++) {
        const int64_t p0 = o * g->C + c0;
        if (o + BN_PREFETCH_AHEAD < g->outer) {
            const int64_t pa = (p0 + BN_PREFETCH_AHEAD * g->C) * g->inner;
            if (need_sums) bn_prefetch_run(bn_at(a->x, pa, g->esize), blk);
            bn_prefetch_run(bn_at(a->dy, pa, g->esize), blk);
        }
        for (int64_t j = 0; j < nc; j++) {
            const int64_t p = p0 + j;
            if (need_sums) {
                const uint8_t *mask = a->relu_mask ? (const uint8_t *)a->relu_mask + p * b->mask_stride : NULL;
                b->k->seg_bwd_reduce(bn_at(a->x, p * g->inner, g->esize), bn_at(a->dy, p * g->inner, g->esize), mask,
                                     g->inner, mean[j], &sg[j], &sgx[j]);
            }
            if (write && run_bytes)
                bn_bwd_apply_plane_to(b, p, a->dx ? sdx + j * run_bytes : NULL, a->daddend ? sda + j * run_bytes : NULL,
                                      0, mean[j], k1[j], k2[j], k3[j]);
            else if (write)
                bn_bwd_apply_plane(b, p, mean[j], k1[j], k2[j], k3[j]);
        }
        if (write && run_bytes) {
            const int64_t off = p0 * g->inner * (int64_t)g->esize;
            if (a->dx) bn_stream_copy((char *)a->dx + off, sdx, (size_t)nc * run_bytes);
            if (a->daddend && a->relu_mask) bn_stream_copy((char *)a->daddend + off, sda, (size_t)nc * run_bytes);
        }
    }
    if (need_sums)
        for (int64_t j = 0; j < nc; j++) bn_bwd_param_grads(b, c0 + j, sg[j], sgx[j], invstd[j]);
}

/* the environment of bn_bwd_channel_schedule's per-thread task */
typedef struct bn_bwd_channel_schedule_env {
    const bn_bwd_ctx *b;
    int nt;
    int need_sums;
} bn_bwd_channel_schedule_env;

static void bn_bwd_channel_schedule_task(void *env_, int t) {
    const bn_bwd_channel_schedule_env *e_ = (const bn_bwd_channel_schedule_env *)env_;
    const bn_bwd_ctx *b = e_->b;
    int nt = e_->nt;
    int need_sums = e_->need_sums;
    (void)b; (void)nt; (void)need_sums;
    const bn_geom *g = &b->g;
    const bnorm_backward_args *a = b->a;
    int64_t cb = bn_block_channels(g, 2, b->stream);
    /* overlap (see the forward): the next block's sums are read between this block's runs */
    const int overlap = BN_OVERLAP && need_sums && (a->dx || a->daddend) && !a->use_global_stats &&
                        (size_t)g->inner * g->esize >= BN_STAGE_PLANE_MAX;
    if (overlap && cb > 1) cb /= 2;
    const size_t run_bytes = bn_stage_plane_bytes(g, cb, b->stream);
    {
        BN_ALIGN64 unsigned char sdx[BN_STAGE_BYTES], sda[BN_STAGE_BYTES];
        double mean[BN_BLOCK_MAX], k1[BN_BLOCK_MAX], k2[BN_BLOCK_MAX], k3[BN_BLOCK_MAX];
        double sg[BN_BLOCK_MAX], sgx[BN_BLOCK_MAX], invstd[BN_BLOCK_MAX];
        double nmean[BN_BLOCK_MAX], ninvstd[BN_BLOCK_MAX], nsg[BN_BLOCK_MAX], nsgx[BN_BLOCK_MAX];
        int64_t lo, hi;
        int have_next = 0;
        bn_range(g->C, t, nt, &lo, &hi);
        for (int64_t c0 = lo; c0 < hi; c0 += cb) {
            const int64_t nc = hi - c0 < cb ? hi - c0 : cb;
            if (a->use_global_stats) {
                bn_bwd_eval_block(b, c0, nc, need_sums, sdx, sda, run_bytes);
                continue;
            }
            if (have_next) { /* sums gathered while the previous block was written */
                for (int64_t j = 0; j < nc; j++) {
                    mean[j] = nmean[j];
                    invstd[j] = ninvstd[j];
                    sg[j] = nsg[j];
                    sgx[j] = nsgx[j];
                }
            } else {
                for (int64_t j = 0; j < nc; j++) {
                    mean[j] = bn_bwd_mean(b, c0 + j);
                    invstd[j] = bn_bwd_invstd(b, c0 + j);
                    sg[j] = sgx[j] = 0;
                }
                if (need_sums)
                    for (int64_t o = 0; o < g->outer; o++) {
                        if (o + BN_PREFETCH_AHEAD < g->outer) {
                            const int64_t pa = ((o + BN_PREFETCH_AHEAD) * g->C + c0) * g->inner;
                            bn_prefetch_run(bn_at(a->x, pa, g->esize), (size_t)(nc * g->inner) * g->esize);
                            bn_prefetch_run(bn_at(a->dy, pa, g->esize), (size_t)(nc * g->inner) * g->esize);
                        }
                        for (int64_t j = 0; j < nc; j++) {
                            int64_t p = o * g->C + c0 + j;
                            const uint8_t *mask = a->relu_mask ? (const uint8_t *)a->relu_mask + p * b->mask_stride : NULL;
                            b->k->seg_bwd_reduce(bn_at(a->x, p * g->inner, g->esize), bn_at(a->dy, p * g->inner, g->esize),
                                                 mask, g->inner, mean[j], &sg[j], &sgx[j]);
                        }
                    }
            }
            if (need_sums)
                for (int64_t j = 0; j < nc; j++) bn_bwd_param_grads(b, c0 + j, sg[j], sgx[j], invstd[j]);
            const int64_t c1 = c0 + nc, nc1 = hi - c1 < cb ? hi - c1 : cb;
            have_next = overlap && nc1 > 0;
            if (have_next)
                for (int64_t j = 0; j < nc1; j++) {
                    nmean[j] = bn_bwd_mean(b, c1 + j);
                    ninvstd[j] = bn_bwd_invstd(b, c1 + j);
                    nsg[j] = nsgx[j] = 0;
                }
            if (a->dx || a->daddend) {
                for (int64_t j = 0; j < nc; j++) bn_bwd_coefs(b, c0 + j, sg[j], sgx[j], invstd[j], &k1[j], &k2[j], &k3[j]);
                for (int64_t o = g->outer - 1; o >= 0; o--) {
                    const int64_t p0 = o * g->C + c0;
                    if (run_bytes) { /* small planes: stage the run of dx (and daddend), stream it whole */
                        const int64_t off = p0 * g->inner * (int64_t)g->esize;
                        for (int64_t j = nc - 1; j >= 0; j--)
                            bn_bwd_apply_plane_to(b, p0 + j, a->dx ? sdx + j * run_bytes : NULL,
                                                  a->daddend ? sda + j * run_bytes : NULL, 0, mean[j], k1[j], k2[j],
                                                  k3[j]);
                        if (a->dx) bn_stream_copy((char *)a->dx + off, sdx, (size_t)nc * run_bytes);
                        if (a->daddend && a->relu_mask)
                            bn_stream_copy((char *)a->daddend + off, sda, (size_t)nc * run_bytes);
                    } else {
                        for (int64_t j = nc - 1; j >= 0; j--)
                            bn_bwd_apply_plane(b, p0 + j, mean[j], k1[j], k2[j], k3[j]);
                    }
                    if (have_next) { /* the next block's sums, in plane order */
                        const int64_t o1 = g->outer - 1 - o;
                        for (int64_t j = 0; j < nc1; j++) {
                            int64_t p = o1 * g->C + c1 + j;
                            const uint8_t *mask = a->relu_mask ? (const uint8_t *)a->relu_mask + p * b->mask_stride : NULL;
                            b->k->seg_bwd_reduce(bn_at(a->x, p * g->inner, g->esize), bn_at(a->dy, p * g->inner, g->esize),
                                                 mask, g->inner, nmean[j], &nsg[j], &nsgx[j]);
                        }
                    }
                }
            }
        }
        if (b->stream) bn_stream_fence();
    }
}

static void bn_bwd_channel_schedule(const bn_bwd_ctx *b, int nt, int need_sums) {
    bn_bwd_channel_schedule_env env_ = {b, nt, need_sums};
    bn_exec_run(b->ex, bn_bwd_channel_schedule_task, &env_);
}

/* Expanded coefficients of a channel block of the run schedule. */
static void bn_bwd_run_coefs(const bn_bwd_ctx *b, const bn_run_scratch *r, int64_t c0, int64_t nc, const double *sg,
                             const double *sgx, const double *invstd) {
    for (int64_t j = 0; j < nc; j++) {
        double k1, k2, k3;
        bn_bwd_coefs(b, c0 + j, sg[j], sgx[j], invstd[j], &k1, &k2, &k3);
        bn_expand(r->c1, j, b->g.inner, (float)k1);
        bn_expand(r->c2, j, b->g.inner, (float)k2);
        bn_expand(r->c3, j, b->g.inner, (float)k3);
    }
}

/* dx (and daddend) of the run of batch index o of a channel block (r->m holds its expanded mask). */
static void bn_bwd_run_apply(const bn_bwd_ctx *b, const bn_run_scratch *r, int64_t o, int64_t c0, int64_t nc) {
    const bn_geom *g = &b->g;
    const bnorm_backward_args *a = b->a;
    const size_t es = g->esize;
    const int64_t off = (o * g->C + c0) * g->inner, n = nc * g->inner;
    char *dx = a->dx ? (char *)a->dx + off * (int64_t)es : NULL;
    char *da = a->daddend && a->relu_mask ? (char *)a->daddend + off * (int64_t)es : NULL;
    b->k->run_bwd_apply(bn_at(b->ax, off, es), bn_at(a->dy, off, es), a->relu_mask ? r->m : NULL,
                        dx && b->stream ? (void *)r->st1 : (void *)dx, da && b->stream ? (void *)r->st2 : (void *)da, n,
                        r->mh, r->ml, r->c1, r->c2, r->c3);
    if (b->stream) {
        if (dx) bn_stream_copy(dx, r->st1, (size_t)n * es);
        if (da) bn_stream_copy(da, r->st2, (size_t)n * es);
    }
}

/* Backward on small planes, channel-owning threads (see bn_fwd_run_schedule): per block, the sums of
 * g and g * (x - mean) element by element over the batch, then dx (and daddend) run by run with
 * expanded coefficients. With global statistics the coefficients do not depend on the sums, so each
 * run's dx follows its sums in the same sweep (one read of x and dy from DRAM). */
/* the environment of bn_bwd_run_schedule's per-thread task */
typedef struct bn_bwd_run_schedule_env {
    const bn_bwd_ctx *b;
    int nt;
    int need_sums;
    double *scratch;
} bn_bwd_run_schedule_env;

static void bn_bwd_run_schedule_task(void *env_, int t) {
    const bn_bwd_run_schedule_env *e_ = (const bn_bwd_run_schedule_env *)env_;
    const bn_bwd_ctx *b = e_->b;
    int nt = e_->nt;
    int need_sums = e_->need_sums;
    double *scratch = e_->scratch;
    (void)b; (void)nt; (void)need_sums; (void)scratch;
    const bn_geom *g = &b->g;
    const bnorm_backward_args *a = b->a;
    const int64_t inner = g->inner, C = g->C;
    const size_t es = g->esize;
    const int64_t cb = bn_run_channels(g, 2);
    const int write = a->dx || (a->daddend && a->relu_mask), eval = a->use_global_stats;
    {
        int64_t lo, hi;
        bn_run_scratch r = bn_run_thread(scratch, C, t, nt, &lo, &hi);
        for (int64_t c0 = lo; c0 < hi; c0 += cb) {
            const int64_t nc = hi - c0 < cb ? hi - c0 : cb, n = nc * inner;
            double mean[BN_RUN_BLOCK_MAX], invstd[BN_RUN_BLOCK_MAX], sg[BN_RUN_BLOCK_MAX], sgx[BN_RUN_BLOCK_MAX];
            for (int64_t j = 0; j < nc; j++) {
                mean[j] = bn_bwd_mean(b, c0 + j);
                invstd[j] = bn_bwd_invstd(b, c0 + j);
                sg[j] = sgx[j] = 0;
                bn_expand_mean(r.mh, r.ml, j, inner, mean[j]);
            }
            const int apply_now = eval && write; /* dx in the sweep of the sums */
            if (apply_now) bn_bwd_run_coefs(b, &r, c0, nc, sg, sgx, invstd);
            if (need_sums || apply_now) {
                if (need_sums)
                    for (int64_t i = 0; i < n; i++) r.s1[i] = r.s2[i] = 0;
                for (int64_t o = 0; o < g->outer; o++) {
                    const int64_t off = (o * C + c0) * inner;
                    if (o + BN_PREFETCH_AHEAD < g->outer) {
                        const int64_t pa = off + BN_PREFETCH_AHEAD * C * inner;
                        if (need_sums) bn_prefetch_run(bn_at(a->x, pa, es), (size_t)n * es);
                        bn_prefetch_run(bn_at(a->dy, pa, es), (size_t)n * es);
                    }
                    if (a->relu_mask)
                        b->k->run_mask_u8((const uint8_t *)a->relu_mask + (o * C + c0) * b->mask_stride, b->mask_stride,
                                          nc, inner, r.m);
                    if (need_sums)
                        b->k->run_bwd_reduce(bn_at(a->x, off, es), bn_at(a->dy, off, es), a->relu_mask ? r.m : NULL, n,
                                             r.mh, r.ml, r.s1, r.s2);
                    if (apply_now) bn_bwd_run_apply(b, &r, o, c0, nc);
                }
            }
            if (need_sums)
                for (int64_t j = 0; j < nc; j++) {
                    for (int64_t i = 0; i < inner; i++) {
                        sg[j] += r.s1[j * inner + i];
                        sgx[j] += r.s2[j * inner + i];
                    }
                    bn_bwd_param_grads(b, c0 + j, sg[j], sgx[j], invstd[j]);
                }
            if (!write || apply_now) continue;
            bn_bwd_run_coefs(b, &r, c0, nc, sg, sgx, invstd);
            for (int64_t o = g->outer - 1; o >= 0; o--) {
                if (a->relu_mask)
                    b->k->run_mask_u8((const uint8_t *)a->relu_mask + (o * C + c0) * b->mask_stride, b->mask_stride, nc,
                                      inner, r.m);
                bn_bwd_run_apply(b, &r, o, c0, nc);
            }
        }
        if (b->stream) bn_stream_fence();
    }
}

static void bn_bwd_run_schedule(const bn_bwd_ctx *b, int nt, int need_sums, double *scratch) {
    bn_bwd_run_schedule_env env_ = {b, nt, need_sums, scratch};
    bn_exec_run(b->ex, bn_bwd_run_schedule_task, &env_);
}

/* The coefficients of dx = g * k1 - k2 - (x - mean) * k3 per channel: double arrays (planes) and
 * compute-type arrays (rows). */
typedef struct bn_bwd_coef {
    const double *mean, *k1, *k2, *k3;
    const void *km, *kml, *ka1, *ka2, *ka3;
} bn_bwd_coef;

/* Rows per piece of the one-pass split schedule (global statistics): a piece of x and dy is reduced,
 * then its dx written while the piece is still in L1. */
#ifndef BN_EVAL_PIECE
#define BN_EVAL_PIECE (16 * 1024)
#endif

/* Phase 1 of the split schedule: sums of g and g*(x - mean) per channel (if need_sums), merged in
 * thread order. With `apply` (global statistics, whose coefficients are known before the sums), dx is
 * written in the same sweep, piece by piece, and phase 2 is skipped. */
/* the environment of bn_bwd_partials's per-thread task */
typedef struct bn_bwd_partials_env {
    const bn_bwd_ctx *b;
    int nt;
    int need_sums;
    const bn_bwd_coef *co;
    int apply;
    double *part;
    double *sg;
    double *sgx;
} bn_bwd_partials_env;

static void bn_bwd_partials_task(void *env_, int t) {
    const bn_bwd_partials_env *e_ = (const bn_bwd_partials_env *)env_;
    const bn_bwd_ctx *b = e_->b;
    int nt = e_->nt;
    int need_sums = e_->need_sums;
    const bn_bwd_coef *co = e_->co;
    int apply = e_->apply;
    double *part = e_->part;
    double *sg = e_->sg;
    double *sgx = e_->sgx;
    (void)b; (void)nt; (void)need_sums; (void)co; (void)apply; (void)part; (void)sg; (void)sgx;
    const bn_bwd_coef *ap = apply ? co : NULL;
    const bn_geom *g = &b->g;
    const bnorm_backward_args *a = b->a;
    const int64_t C = g->C;
    const size_t es = g->esize;
    {
        double *ps = part + (size_t)t * 2 * C, *psx = ps + C;
        for (int64_t c = 0; c < C; c++) ps[c] = psx[c] = 0;
        int64_t lo, hi;
        if (g->planes) {
            bn_range(g->outer * C, t, nt, &lo, &hi);
            for (int64_t p = lo; p < hi; p++) {
                int64_t c = p % C;
                const uint8_t *mask = a->relu_mask ? (const uint8_t *)a->relu_mask + p * b->mask_stride : NULL;
                if (need_sums)
                    b->k->seg_bwd_reduce(bn_at(a->x, p * g->inner, es), bn_at(a->dy, p * g->inner, es), mask,
                                         g->inner, bn_bwd_mean(b, c), &ps[c], &psx[c]);
                if (ap) bn_bwd_apply_plane(b, p, ap->mean[c], ap->k1[c], ap->k2[c], ap->k3[c]);
            }
        } else {
            bn_range(g->outer, t, nt, &lo, &hi);
            int64_t piece = ap ? (int64_t)(BN_EVAL_PIECE / ((size_t)C * es))
                            : b->gbuf ? (int64_t)(bn_tuning_get()->apply_piece_bytes / ((size_t)C * es)) : hi - lo;
            if (piece < 1) piece = 1;
            for (int64_t r0 = lo, nr; r0 < hi; r0 += nr) {
                nr = hi - r0 < piece ? hi - r0 : piece;
                const int64_t off = r0 * C;
                const uint8_t *mask = a->relu_mask ? (const uint8_t *)a->relu_mask + r0 * b->mask_stride : NULL;
                const void *dy = bn_at(a->dy, off, es);
                if (b->gbuf) { /* g for these rows, then everything unmasked on g */
                    bn_bwd_write_g(b, r0, nr, co->km, co->kml);
                    dy = bn_at(b->gbuf, off, es);
                    mask = NULL;
                }
                if (need_sums)
                    b->k->rows_bwd_reduce(bn_at(a->x, off, es), dy, mask, b->mask_stride, nr, C, co->km, co->kml, ps,
                                          psx);
                if (ap && (!b->gbuf || a->dx))
                    b->k->rows_bwd_apply(bn_at(b->ax, off, es), dy, mask, b->mask_stride,
                                         a->dx ? (char *)a->dx + off * (int64_t)es : NULL,
                                         a->daddend && !b->gbuf ? (char *)a->daddend + off * (int64_t)es : NULL, nr, C,
                                         ap->km, ap->kml, ap->ka1, ap->ka2, ap->ka3, b->stream);
            }
        }
        if (ap && b->stream) bn_stream_fence();
    }
}

static void bn_bwd_partials(const bn_bwd_ctx *b, int nt, int need_sums, const bn_bwd_coef *co, int apply,
                            double *part, double *sg, double *sgx) {
    const int64_t C = b->g.C;
    bn_bwd_partials_env env_ = {b, nt, need_sums, co, apply, part, sg, sgx};
    bn_exec_run(b->ex, bn_bwd_partials_task, &env_);
    for (int64_t c = 0; c < C; c++) {
        double s = 0, sx = 0;
        for (int t = 0; t < nt; t++) {
            s += part[(size_t)t * 2 * C + c];
            sx += part[(size_t)t * 2 * C + C + c];
        }
        sg[c] = s;
        sgx[c] = sx;
    }
}

/* the environment of bn_bwd_apply_split's per-thread task */
typedef struct bn_bwd_apply_split_env {
    const bn_bwd_ctx *b;
    int nt;
    const bn_bwd_coef *co;
} bn_bwd_apply_split_env;

static void bn_bwd_apply_split_task(void *env_, int t) {
    const bn_bwd_apply_split_env *e_ = (const bn_bwd_apply_split_env *)env_;
    const bn_bwd_ctx *b = e_->b;
    int nt = e_->nt;
    const bn_bwd_coef *co = e_->co;
    (void)b; (void)nt; (void)co;
    const bn_geom *g = &b->g;
    const bnorm_backward_args *a = b->a;
    const int64_t C = g->C;
    const size_t es = g->esize;
    const double *mean = co->mean, *k1 = co->k1, *k2 = co->k2, *k3 = co->k3;
    {
        int64_t lo, hi;
        if (g->planes) {
            bn_range(g->outer * C, t, nt, &lo, &hi);
            const size_t pb = bn_stage_plane_bytes(g, 1, b->stream);
            if (pb) { /* small planes: consecutive planes are staged and streamed as one run */
                BN_ALIGN64 unsigned char sdx[BN_STAGE_BYTES], sda[BN_STAGE_BYTES];
                const int64_t k = (int64_t)(BN_STAGE_BYTES / pb);
                const int wda = a->daddend && a->relu_mask;
                for (int64_t p0 = lo; p0 < hi; p0 += k) {
                    const int64_t np = hi - p0 < k ? hi - p0 : k;
                    for (int64_t j = 0; j < np; j++) {
                        int64_t c = (p0 + j) % C;
                        bn_bwd_apply_plane_to(b, p0 + j, a->dx ? sdx + j * pb : NULL, wda ? sda + j * pb : NULL, 0,
                                              mean[c], k1[c], k2[c], k3[c]);
                    }
                    if (a->dx) bn_stream_copy((char *)a->dx + p0 * (int64_t)pb, sdx, (size_t)np * pb);
                    if (wda) bn_stream_copy((char *)a->daddend + p0 * (int64_t)pb, sda, (size_t)np * pb);
                }
            } else {
                for (int64_t p = lo; p < hi; p++) {
                    int64_t c = p % C;
                    bn_bwd_apply_plane(b, p, mean[c], k1[c], k2[c], k3[c]);
                }
            }
        } else {
            bn_range(g->outer, t, nt, &lo, &hi);
            if (hi <= lo) return;
            /* the sums pass read the thread's rows front to back, so the rows read last are the ones
               still cached: apply in pieces from the end of the range back (as the forward does) */
            int64_t piece = BN_BWD_REVERSE ? (int64_t)(bn_tuning_get()->apply_piece_bytes / ((size_t)C * es)) : hi - lo;
            if (piece < 1) piece = 1;
            for (int64_t r1 = hi; r1 > lo;) {
                const int64_t r0 = r1 - piece > lo ? r1 - piece : lo, off = r0 * C;
                const uint8_t *mask = a->relu_mask ? (const uint8_t *)a->relu_mask + r0 * b->mask_stride : NULL;
                /* with gbuf: g (written by the sums pass) as dy, unmasked; daddend already holds it */
                void *dadd = a->daddend && !b->gbuf ? (char *)a->daddend + off * (int64_t)es : NULL;
                if (a->dx || dadd)
                    b->k->rows_bwd_apply(bn_at(b->ax, off, es), bn_at(b->gbuf ? b->gbuf : a->dy, off, es),
                                         b->gbuf ? NULL : mask, b->mask_stride,
                                         a->dx ? (char *)a->dx + off * (int64_t)es : NULL, dadd, r1 - r0, C, co->km,
                                         co->kml, co->ka1, co->ka2, co->ka3, b->stream);
                r1 = r0;
            }
        }
        if (b->stream) bn_stream_fence();
    }
}

static void bn_bwd_apply_split(const bn_bwd_ctx *b, int nt, const bn_bwd_coef *co) {
    bn_bwd_apply_split_env env_ = {b, nt, co};
    bn_exec_run(b->ex, bn_bwd_apply_split_task, &env_);
}

void bn_cpu_plan_backward(bnorm_plan *p) {
    const bnorm_backward_args *a = &p->ba;
    const bn_geom *g = &p->g;
    const int nt = p->ex.nt;
    p->isa = bnorm_get_isa();
    p->k = bn_kernels_variant(p->isa, a->desc.dtype);
    bn_ws_layout(p);
    if (!p->comm && g->planes && g->C >= nt && g->m > 0 && bn_small_planes(g, a->desc.dtype))
        bn_plan_set(p, BN_SCHED_RUN);
    else if (!p->comm && g->planes && g->C >= nt && g->m > 0)
        bn_plan_set(p, BN_SCHED_CHANNEL);
    else
        bn_plan_set(p, BN_SCHED_SPLIT);
}

bnorm_status bn_cpu_backward(const bnorm_plan *p, const bnorm_backward_args *a, double *ws) {
    static const char *F = "bnorm_backward";
    bn_bwd_ctx b;
    b.g = p->g;
    b.a = a;
    b.ex = &p->ex;
    b.k = p->k;
    b.pd = p->pd;
    b.dbl = a->desc.dtype == BNORM_DTYPE_F64;
    b.mask_stride = bn_mask_stride(&b.g);
    b.stream = bn_stream_output(&b.g, 1);
    b.n_total = (double)b.g.m;
    b.ax = a->use_global_stats ? NULL : a->x;
    b.delta = NULL;
    b.gbuf = bn_bwd_masked_rows(a, &b.g, p->comm);
    const bn_geom *g = &b.g;
    const int64_t C = g->C;
    const int nt = p->ex.nt;
    const bnorm_comm *comm = p->comm;
    const int need_sums = !a->use_global_stats || a->dweight || a->dbias || comm;
    bn_arena ar = {ws, 0, 0, 0};
    /* float64 training backward: the saved mean is one double; its residual makes the backward as
       accurate as a double-double mean (docs/design.md) */
    double *sd = bn_take(&ar, C), *delta = bn_take(&ar, C);
    const int resid = b.dbl && !a->use_global_stats;
    if (resid) {
        const size_t mark = ar.used;
        if (g->m > 0) bn_bwd_residual_sums(&b, nt, bn_take(&ar, (size_t)nt * 2 * C), bn_take(&ar, C), sd);
        else
            for (int64_t c = 0; c < C; c++) sd[c] = 0;
        ar.used = mark;
        if (!comm) {
            for (int64_t c = 0; c < C; c++) delta[c] = g->m > 0 ? sd[c] / (double)g->m : 0;
            b.delta = delta;
        }
    }

    if (p->sched == BN_SCHED_RUN) {
        bn_bwd_run_schedule(&b, nt, need_sums, bn_take(&ar, (size_t)nt * BN_RUN_SCRATCH));
        return BNORM_STATUS_OK;
    }
    if (p->sched == BN_SCHED_CHANNEL) {
        bn_bwd_channel_schedule(&b, nt, need_sums);
        return BNORM_STATUS_OK;
    }
    double *part = bn_take(&ar, (size_t)nt * 7 * C);
    double *sg = bn_take(&ar, C), *sgx = bn_take(&ar, C), *mean = bn_take(&ar, C), *inv = bn_take(&ar, C);
    double *k1 = bn_take(&ar, C), *k2 = bn_take(&ar, C), *k3 = bn_take(&ar, C);
    const void *out = a->dx ? a->dx : a->daddend;
    double *km = bn_take_ahead(&ar, C, out, 0, b.stream), *kml = bn_take_ahead(&ar, C, out, 1, b.stream);
    double *ka1 = bn_take_ahead(&ar, C, out, 2, b.stream), *ka2 = bn_take_ahead(&ar, C, out, 3, b.stream);
    double *ka3 = bn_take_ahead(&ar, C, out, 4, b.stream);
    for (int64_t c = 0; c < C; c++) {
        mean[c] = bn_bwd_mean(&b, c);
        inv[c] = bn_bwd_invstd(&b, c);
        bn_ka_set_mean(km, kml, b.dbl, c, mean[c]);
        sg[c] = sgx[c] = 0;
    }
    const bn_bwd_coef co = {mean, k1, k2, k3, km, kml, ka1, ka2, ka3};
    /* with global statistics the coefficients come first and dx is written in the sweep of the sums */
    const int onepass = a->use_global_stats && (a->dx || a->daddend);
    if (onepass)
        for (int64_t c = 0; c < C; c++) {
            bn_bwd_coefs(&b, c, 0, 0, inv[c], &k1[c], &k2[c], &k3[c]);
            bn_ka_set(ka1, b.dbl, c, k1[c]);
            bn_ka_set(ka2, b.dbl, c, k2[c]);
            bn_ka_set(ka3, b.dbl, c, k3[c]);
        }
    if ((need_sums || onepass) && g->m > 0) bn_bwd_partials(&b, nt, need_sums, &co, onepass, part, sg, sgx);
    /* parameter gradients from the local sums (or the global ones on request, below) */
    double *gsg = sg, *gsgx = sgx;
    if (comm) {
        /* payload: local count, then the two sums and the float64 mean residual sums; the global count
           is the sum of the counts */
        size_t cnt = BN_COMM_HDR + 1 + 3 * (size_t)C;
        double *send = bn_take(&ar, cnt), *recv = bn_take(&ar, cnt * (size_t)comm->size);
        /* no pointer-presence flags: a rank with an empty batch may pass NULL buffers */
        bn_comm_header(send, BN_OP_BACKWARD, &a->desc, 0);
        send[BN_COMM_HDR] = (double)g->m;
        for (int64_t c = 0; c < C; c++) {
            send[BN_COMM_HDR + 1 + c] = sg[c];
            send[BN_COMM_HDR + 1 + C + c] = sgx[c];
            send[BN_COMM_HDR + 1 + 2 * C + c] = resid ? sd[c] : 0;
        }
        bnorm_status st = bn_comm_exchange(F, comm, send, cnt, recv);
        if (st) return st;
        /* global sums in rank order, into the per-thread area (no longer needed) */
        gsg = part;
        gsgx = part + C;
        b.n_total = 0;
        for (int r = 0; r < comm->size; r++) b.n_total += recv[(size_t)r * cnt + BN_COMM_HDR];
        for (int64_t c = 0; c < C; c++) {
            double s = 0, sx = 0;
            for (int r = 0; r < comm->size; r++) {
                s += recv[(size_t)r * cnt + BN_COMM_HDR + 1 + c];
                sx += recv[(size_t)r * cnt + BN_COMM_HDR + 1 + C + c];
            }
            gsg[c] = s;
            gsgx[c] = sx;
        }
        if (resid) {
            for (int64_t c = 0; c < C; c++) {
                double d = 0;
                for (int r = 0; r < comm->size; r++) d += recv[(size_t)r * cnt + BN_COMM_HDR + 1 + 2 * C + c];
                delta[c] = b.n_total > 0 ? d / b.n_total : 0;
            }
            b.delta = delta;
        }
    }
    if (need_sums) {
        const int global = comm && a->reduce_param_grads;
        for (int64_t c = 0; c < C; c++)
            bn_bwd_param_grads(&b, c, global ? gsg[c] : sg[c], global ? gsgx[c] : sgx[c], inv[c]);
    }
    if (g->m > 0 && (a->dx || a->daddend) && !onepass) {
        for (int64_t c = 0; c < C; c++) {
            bn_bwd_coefs(&b, c, gsg[c], gsgx[c], inv[c], &k1[c], &k2[c], &k3[c]);
            bn_ka_set(ka1, b.dbl, c, k1[c]);
            bn_ka_set(ka2, b.dbl, c, k2[c]);
            bn_ka_set(ka3, b.dbl, c, k3[c]);
        }
        bn_bwd_apply_split(&b, nt, &co);
    }
    return BNORM_STATUS_OK;
}
