/* consumer.c - a program built against an installed bnorm (tests/install/check_install.sh builds it
 * through find_package with bnorm::bnorm and bnorm::bnorm_static, and through pkg-config, shared and
 * --static). It normalizes a small tensor and checks the result, so a broken install fails. */
#include <bnorm/bnorm.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

/* OpenMP is private to bnorm: linking it must not put -fopenmp on the consumer's own sources. */
#ifdef _OPENMP
#error "bnorm's package leaked -fopenmp into a consumer's compile flags"
#endif

int main(void) {
    float x[8] = {1, 2, 3, 4, 5, 6, 7, 8}, y[8];
    bnorm_desc d = {.dtype = BNORM_DTYPE_F32, .layout = BNORM_LAYOUT_CHANNELS_FIRST, .rank = 2, .dims = {4, 2}};
    bnorm_forward_args a = {.desc = d, .x = x, .y = y, .eps = 0, .training = 1};
    if (bnorm_version() != BNORM_VERSION || strcmp(bnorm_version_string(), BNORM_VERSION_STRING) != 0) {
        fprintf(stderr, "consumer: header %s (%d) but library %s (%u)\n", BNORM_VERSION_STRING, BNORM_VERSION,
                bnorm_version_string(), bnorm_version());
        return 1;
    }
    if (bnorm_forward(&a) != BNORM_STATUS_OK) {
        fprintf(stderr, "consumer: %s\n", bnorm_last_error());
        return 1;
    }
    /* channel 0 holds 1,3,5,7: mean 4, biased var 5 */
    if (fabsf(y[0] - (1 - 4) / sqrtf(5)) > 1e-6f) {
        fprintf(stderr, "consumer: y[0] = %g\n", y[0]);
        return 1;
    }
    printf("consumer: bnorm %s works\n", bnorm_version_string());
    return 0;
}
