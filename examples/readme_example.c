/* readme_example.c - the README's short example, as a whole program (the README shows this file;
 * tests/repo/check_repo.sh checks that the two agree and ctest runs it as example_readme). */
#include <bnorm/bnorm.h>
#include <stdio.h>
#include <stdlib.h>

#define CHECK(call)                                                              \
    do {                                                                         \
        if ((call) != BNORM_STATUS_OK) {                                         \
            fprintf(stderr, "%s failed: %s\n", #call, bnorm_last_error());       \
            return 1;                                                            \
        }                                                                        \
    } while (0)

int main(void) {
    /* x: 16 images of 64 channels, 28x28, float32, NCHW */
    bnorm_desc d = {.dtype = BNORM_DTYPE_F32, .layout = BNORM_LAYOUT_CHANNELS_FIRST,
                    .rank = 4, .dims = {16, 64, 28, 28}};
    size_t n = (size_t)bnorm_desc_numel(&d);
    float *x = malloc(n * sizeof *x), *y = malloc(n * sizeof *y);
    float *dy = malloc(n * sizeof *dy), *dx = malloc(n * sizeof *dx);
    if (!x || !y || !dy || !dx) return 1;
    for (size_t i = 0; i < n; i++) {
        x[i] = (float)(i % 97) / 97.0f;
        dy[i] = (float)(i % 89) / 89.0f - 0.5f;
    }

    bnorm_layer_options o = bnorm_layer_options_default(64);  /* PyTorch: eps 1e-5, momentum 0.1 */
    bnorm_layer *bn;
    CHECK(bnorm_layer_create(&o, &bn));
    CHECK(bnorm_layer_forward(bn, &d, x, y, NULL));         /* training: batch statistics, running stats updated */
    CHECK(bnorm_layer_backward(bn, &d, x, dy, dx, NULL));   /* dx overwritten; weight/bias grads accumulated */
    float *gw;
    CHECK(bnorm_layer_tensor(bn, BNORM_TENSOR_WEIGHT_GRAD, (void **)&gw));
    printf("dL/dweight[0] = %g\n", gw[0]);

    CHECK(bnorm_layer_set_training(bn, 0));
    CHECK(bnorm_layer_forward(bn, &d, x, y, NULL));         /* eval: running statistics */
    bnorm_status s = bnorm_layer_save(bn, "bn1.safetensors", "layer1.0.bn1.");
    printf("save: %s\n", bnorm_status_string(s));           /* "unsupported" if built without state I/O */
    bnorm_layer_destroy(bn);
    free(x), free(y), free(dy), free(dx);
    return s == BNORM_STATUS_OK || s == BNORM_STATUS_UNSUPPORTED ? 0 : 1;
}
