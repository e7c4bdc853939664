/*
 * demo_data.h - the data sets of the training examples: the UCI handwritten digits shipped in data/
 * (CSV, gzip) and Fashion-MNIST from Debian's dataset-fashion-mnist (IDX, gzip). Pixels are scaled to
 * [0, 1] floats, one row per sample.
 */
#ifndef BNORM_DEMO_DATA_H
#define BNORM_DEMO_DATA_H

#include <stddef.h>
#include <stdint.h>

typedef struct demo_dataset {
    int n;        /* samples */
    int dim;      /* features per sample */
    int classes;  /* labels are 0 .. classes-1 */
    float *x;     /* [n][dim] */
    uint8_t *y;   /* [n] */
} demo_dataset;

/* Reads the digits CSV (plain or gzip): each line holds 64 pixels 0..16 then the label 0..9.
 * path NULL: the copy of data/digits.csv.gz compiled into the program. Returns 0, or -1 with a message
 * in err. */
int demo_load_digits_csv(const char *path, demo_dataset *out, char *err, size_t err_cap);

/* Reads an IDX image file (magic 0x803, uint8) and its label file (magic 0x801) into one data set,
 * pixels scaled by 1/255. limit > 0 keeps only the first limit samples. */
int demo_load_idx(const char *images_path, const char *labels_path, int limit, demo_dataset *out, char *err,
                  size_t err_cap);

/* Splits src into train and test sets: a permutation drawn from seed puts n_test samples into test and
 * the rest into train. Deterministic for a given seed. */
int demo_split(const demo_dataset *src, int n_test, uint64_t seed, demo_dataset *train, demo_dataset *test,
               char *err, size_t err_cap);

void demo_dataset_free(demo_dataset *d);

/* A small, seedable generator (splitmix64) shared by the examples. */
uint64_t demo_rng_next(uint64_t *state);
double demo_rng_uniform(uint64_t *state); /* [0, 1) */
double demo_rng_normal(uint64_t *state);  /* N(0, 1), Box-Muller */
/* perm[i] = a uniformly shuffled permutation of 0 .. n-1 (Fisher-Yates). */
void demo_shuffle(int *perm, int n, uint64_t *state);

#endif
