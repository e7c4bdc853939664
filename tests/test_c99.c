/*
 * test_c99.c - proves the public header is strict C99: this file includes nothing of bnorm but
 * bnorm/bnorm.h and is compiled with -std=c99 -pedantic -Werror -Wall -Wextra (tests/core.cmake).
 * It also links the shared library, so the exported symbols are checked, and makes a few calls whose
 * results are compared with values computed here by hand.
 */
#include "bnorm/bnorm.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

static long passed, failed;

static void check(int ok, const char *what, int line) {
    if (ok) {
        passed++;
    } else {
        failed++;
        fprintf(stderr, "FAIL test_c99.c:%d: %s (last error: %s)\n", line, what, bnorm_last_error());
    }
}
#define CHECK(cond) check((cond) != 0, #cond, __LINE__)

int main(void) {
    char version[32];
    bnorm_desc d = {BNORM_DTYPE_F32, BNORM_LAYOUT_CHANNELS_FIRST, 2, {4, 2}};
    /* x: channel 0 = 1,2,3,4 (mean 2.5, biased var 1.25); channel 1 = 5,5,5,5 (var 0) */
    float x[8] = {1, 5, 2, 5, 3, 5, 4, 5};
    float y[8];
    float w[2] = {2, 3}, b[2] = {0.5f, -1};
    float sm[2], si[2];
    bnorm_forward_args fa;
    bnorm_layer *layer = NULL;
    bnorm_layer_options opt = bnorm_layer_options_default(2);
    int64_t nbt = -1;
    int i;

    sprintf(version, "%d.%d.%d", BNORM_VERSION_MAJOR, BNORM_VERSION_MINOR, BNORM_VERSION_PATCH);
    CHECK(strcmp(bnorm_version_string(), version) == 0);
    CHECK(strcmp(bnorm_version_string(), BNORM_VERSION_STRING) == 0);
    CHECK(bnorm_version() == BNORM_VERSION);
    CHECK(BNORM_VERSION == BNORM_VERSION_MAJOR * 10000 + BNORM_VERSION_MINOR * 100 + BNORM_VERSION_PATCH);
#ifdef BNORM_CMAKE_PROJECT_VERSION
    CHECK(strcmp(bnorm_version_string(), BNORM_CMAKE_PROJECT_VERSION) == 0);
#endif
    CHECK(strcmp(bnorm_status_string(BNORM_STATUS_OK), "success") == 0);
    CHECK(bnorm_desc_check(&d) == BNORM_STATUS_OK);
    CHECK(bnorm_desc_numel(&d) == 8);
    CHECK(bnorm_dtype_size(BNORM_DTYPE_BF16) == 2);

    memset(&fa, 0, sizeof fa);
    fa.desc = d;
    fa.x = x;
    fa.y = y;
    fa.weight = w;
    fa.bias = b;
    fa.eps = 0;
    fa.training = 1;
    fa.save_mean = sm;
    fa.save_invstd = si;
    CHECK(bnorm_forward(&fa) == BNORM_STATUS_OK);
    CHECK(fabs(sm[0] - 2.5) < 1e-6 && fabs(sm[1] - 5) < 1e-6);
    CHECK(fabs(si[0] - 1 / sqrt(1.25)) < 1e-6);
    CHECK(si[1] == 0); /* eps = 0 and a constant channel: invstd 0, y = bias (PyTorch) */
    for (i = 0; i < 4; i++) {
        CHECK(fabs(y[2 * i] - ((x[2 * i] - 2.5) / sqrt(1.25) * 2 + 0.5)) < 1e-5);
        CHECK(y[2 * i + 1] == -1);
    }

    CHECK(bnorm_layer_create(&opt, &layer) == BNORM_STATUS_OK && layer != NULL);
    CHECK(bnorm_layer_forward(layer, &d, x, y, NULL) == BNORM_STATUS_OK);
    CHECK(bnorm_layer_get_num_batches_tracked(layer, &nbt) == BNORM_STATUS_OK && nbt == 1);
    bnorm_layer_destroy(layer);
    bnorm_layer_destroy(NULL);

    d.rank = 1;
    CHECK(bnorm_desc_check(&d) == BNORM_STATUS_INVALID_ARGUMENT);
    CHECK(strncmp(bnorm_last_error(), "bnorm_desc_check", 16) == 0);

    printf("test_c99: %ld passed, %ld failed\n", passed, failed);
    return failed ? 1 : 0;
}
