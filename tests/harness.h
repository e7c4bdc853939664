/*
 * harness.h - what every bnorm test shares: checks that print both values and keep counting, a
 * seeded random generator (BNORM_TEST_SEED replays a run), typed buffers with deliberate misalignment,
 * and conversion of test data between double and the library's dtypes.
 * Each test program ends with th_finish(), which prints "N passed, N failed" and returns the exit code.
 */
#ifndef BNORM_TEST_HARNESS_H
#define BNORM_TEST_HARNESS_H

#include "bnorm/bnorm.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

extern long th_passed, th_failed;

#define CHECK(cond, ...)                                                  \
    do {                                                                  \
        if (cond) {                                                       \
            th_passed++;                                                  \
        } else {                                                          \
            th_failed++;                                                  \
            fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
            fprintf(stderr, __VA_ARGS__);                                 \
            fprintf(stderr, "\n");                                        \
        }                                                                 \
    } while (0)

/* Checks a status; on mismatch prints both and the library's message. */
#define CHECK_STATUS(expr, want)                                                                   \
    do {                                                                                           \
        bnorm_status th_s_ = (expr);                                                               \
        CHECK(th_s_ == (want), "got %s (%s), want %s", bnorm_status_string(th_s_), bnorm_last_error(), \
              bnorm_status_string(want));                                                          \
    } while (0)

int th_finish(const char *name);

/* Random numbers: a seed from BNORM_TEST_SEED or the clock, printed once so a run can be replayed. */
void th_seed(uint64_t fallback_name_hash);
uint64_t th_next(void);
double th_uniform(void);  /* [0, 1) */
double th_normal(void);   /* N(0, 1) */
int64_t th_randint(int64_t lo, int64_t hi); /* [lo, hi] */

/* A buffer of n elements of dtype at a byte offset `misalign` from a 64-byte boundary. */
typedef struct th_buf {
    void *base;
    void *p;
    int64_t n;
    bnorm_dtype dtype;
} th_buf;
th_buf th_alloc(bnorm_dtype dtype, int64_t n, int misalign);
void th_free(th_buf *b);
/* Stores doubles into the buffer (rounded to its dtype), and reads them back. */
void th_store(th_buf *b, const double *v);
void th_load(const th_buf *b, double *v);
/* Rounds each value to the dtype (so the reference sees exactly what the library sees). */
void th_round(bnorm_dtype dtype, double *v, int64_t n);

/* max |a-b| / (atol + rtol*|b|) over n values; NaN positions must match (NaN in one only = inf). */
double th_err(const double *a, const double *b, int64_t n, double atol, double rtol);

/* Largest finite |v|. */
double th_maxabs(const double *v, int64_t n);
/* |got - want| <= tol * max(max|want|, floor) elementwise, NaN positions matching: an absolute
 * tolerance scaled by the reference's magnitude, or by `floor` (the size of the terms that cancel in
 * it) when larger. */
int th_close_scaled(const double *got, const double *want, int64_t n, double tol, double floor);

#endif
