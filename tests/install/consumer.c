/* consumer.c - a program built against an installed bnorm, through CMake's find_package and through
 * pkg-config. It normalizes a small tensor and checks the result, so a broken install fails. */
#include <bnorm/bnorm.h>
#include <math.h>
#include <stdio.h>

int main(void) {
    float x[8] = {1, 2, 3, 4, 5, 6, 7, 8}, y[8];
    bnorm_desc d = {.dtype = BNORM_DTYPE_F32, .layout = BNORM_LAYOUT_CHANNELS_FIRST, .rank = 2, .dims = {4, 2}};
    bnorm_forward_args a = {.desc = d, .x = x, .y = y, .eps = 0, .training = 1};
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
