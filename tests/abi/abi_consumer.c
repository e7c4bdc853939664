/*
 * abi_consumer.c - a program built against this header, run against a library whose argument structs
 * have a field appended after ABI 1 (the same sources compiled with -DBNORM_ABI_TEST_APPEND). It must
 * keep working, with struct_size = sizeof (its own, smaller size) and with struct_size = 0, and give
 * the float64 reference's results.
 */
#include "harness.h"
#include "ref.h"

static void run(int explicit_size) {
    const size_t struct_size = explicit_size ? sizeof(bnorm_forward_args) : 0;
    enum { N = 6, C = 3, S = 10, NUM = N * C * S };
    double x[NUM], dy[NUM], y[NUM], dx[NUM], yr[NUM], dxr[NUM], w[C] = {1, 2, 0.5}, b[C] = {0, 1, -1};
    double mean[C], invstd[C], lo[C], rm[C] = {0, 0, 0}, rv[C] = {1, 1, 1}, mr[C], ir[C], dw[C], db[C], dwr[C], dbr[C];
    for (int i = 0; i < NUM; i++) x[i] = 3 + th_normal(), dy[i] = th_normal();
    bnorm_desc d = {.dtype = BNORM_DTYPE_F64, .layout = BNORM_LAYOUT_CHANNELS_FIRST, .rank = 3, .dims = {N, C, S}};
    bnorm_forward_args fa = {.struct_size = struct_size, .desc = d, .x = x, .y = y, .weight = w, .bias = b,
                             .eps = 1e-5, .training = 1, .running_mean = rm, .running_var = rv, .momentum = 0.1,
                             .save_mean = mean, .save_invstd = invstd, .save_mean_lo = lo, .num_threads = 2};
    /* the bytes after the caller's struct are not zero: a library that read past struct_size would
       see a nonzero appended field (it refuses one) */
    union {
        bnorm_forward_args a;
        unsigned char b[sizeof(bnorm_forward_args) + 64];
    } u;
    memset(u.b, 0xab, sizeof u.b);
    memcpy(u.b, &fa, sizeof fa);
    CHECK_STATUS(bnorm_forward(&u.a), BNORM_STATUS_OK);
    CHECK_STATUS(bnorm_forward(&fa), BNORM_STATUS_OK);
    bnorm_backward_args ba = {.struct_size = explicit_size ? sizeof(bnorm_backward_args) : 0, .desc = d, .x = x, .dy = dy, .dx = dx, .weight = w,
                              .mean = mean, .mean_lo = lo, .invstd = invstd, .dweight = dw, .dbias = db};
    CHECK_STATUS(bnorm_backward(&ba), BNORM_STATUS_OK);
    ref_shape sh = {N, C, S, 0};
    ref_forward_train(&sh, x, w, b, NULL, 0, 1e-5, yr, mr, NULL, ir);
    ref_backward(&sh, x, dy, w, mr, ir, 0, NULL, dxr, NULL, dwr, dbr);
    CHECK(th_err(y, yr, NUM, 1e-12, 1e-12) <= 1, "struct_size %zu: y", struct_size);
    CHECK(th_err(dx, dxr, NUM, 1e-12, 1e-12) <= 1, "struct_size %zu: dx", struct_size);
    CHECK(th_err(dw, dwr, C, 1e-11, 1e-11) <= 1, "struct_size %zu: dweight", struct_size);
    /* plans and the layer options */
    bnorm_plan *p = NULL;
    CHECK_STATUS(bnorm_plan_create_forward(&fa, &p), BNORM_STATUS_OK);
    CHECK_STATUS(bnorm_plan_forward(p, &fa), BNORM_STATUS_OK);
    bnorm_plan_destroy(p);
    bnorm_layer_options o = bnorm_layer_options_default(C);
    o.struct_size = explicit_size ? sizeof o : 0;
    o.param_dtype = BNORM_DTYPE_F64;
    bnorm_layer *l = NULL;
    CHECK_STATUS(bnorm_layer_create(&o, &l), BNORM_STATUS_OK);
    CHECK_STATUS(bnorm_layer_forward(l, &d, x, y, NULL), BNORM_STATUS_OK);
    ref_forward_train(&sh, x, NULL, NULL, NULL, 0, 1e-5, yr, mr, NULL, ir);
    CHECK(th_err(y, yr, NUM, 1e-12, 1e-12) <= 1, "struct_size %zu: layer y", struct_size);
    bnorm_layer_destroy(l);
}

int main(void) {
    th_seed(17);
    run(1);
    run(0);
    return th_finish("abi_consumer");
}
