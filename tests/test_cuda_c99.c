/* test_cuda_c99.c - bnorm_cuda.h compiles as strict C99 without any CUDA header, and the shared
 * library answers without a GPU: argument errors first (as on the CPU), then DEVICE where a device is
 * needed and none is usable (with a GPU the same calls must not report DEVICE). */
#include "bnorm/bnorm_cuda.h"

#include <stdio.h>
#include <string.h>

static int failed;
#define EXPECT(cond)                                                   \
    do {                                                               \
        if (!(cond)) {                                                 \
            printf("FAIL line %d: %s (%s)\n", __LINE__, #cond, bnorm_last_error()); \
            failed = 1;                                                \
        }                                                              \
    } while (0)

int main(void) {
    bnorm_desc d;
    bnorm_forward_args fa;
    bnorm_backward_args ba;
    int ndev = bnorm_cuda_device_count();
    memset(&d, 0, sizeof d);
    d.dtype = BNORM_DTYPE_F32;
    d.layout = BNORM_LAYOUT_CHANNELS_FIRST;
    d.rank = 4;
    d.dims[0] = 2; d.dims[1] = 3; d.dims[2] = 4; d.dims[3] = 5;
    printf("CUDA devices: %d\n", ndev);
    EXPECT(ndev >= 0);
    EXPECT(bnorm_cuda_workspace_size(&d, 1) > 0);
    EXPECT(bnorm_cuda_workspace_size(NULL, 1) == 0);
    EXPECT(strcmp(bnorm_status_string(BNORM_STATUS_DEVICE), "a GPU (CUDA) operation failed") == 0);
    EXPECT(bnorm_cuda_forward(NULL, NULL) == BNORM_STATUS_NULL_POINTER);
    EXPECT(strstr(bnorm_last_error(), "bnorm_cuda_forward") != NULL);
    memset(&fa, 0, sizeof fa);
    fa.desc = d;
    fa.training = 1;
    EXPECT(bnorm_cuda_forward(&fa, NULL) == BNORM_STATUS_NULL_POINTER); /* x is NULL */
    fa.desc.dims[0] = 0;
    EXPECT(bnorm_cuda_forward(&fa, NULL) == BNORM_STATUS_OK); /* empty batch: nothing to do */
    memset(&ba, 0, sizeof ba);
    ba.desc = d;
    ba.desc.dims[0] = 0;
    ba.mean = &d; /* any non-NULL: checked as device memory only where a device exists */
    ba.invstd = &d;
    if (ndev == 0) EXPECT(bnorm_cuda_backward(&ba, NULL) == BNORM_STATUS_DEVICE);
    else EXPECT(bnorm_cuda_backward(&ba, NULL) == BNORM_STATUS_INVALID_ARGUMENT); /* host pointers */
    printf("test_cuda_c99: %s\n", failed ? "FAILED" : "passed");
    return failed;
}
