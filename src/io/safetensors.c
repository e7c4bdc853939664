/* no_state_io.c - stands in for safetensors.c when the library is built without cJSON. */
#include "../core/internal.h"

bnorm_status bnorm_layer_save(const bnorm_layer *layer, const char *path, const char *prefix) {
    (void)layer; (void)path; (void)prefix;
    return bn_fail(BNORM_STATUS_UNSUPPORTED, "bnorm_layer_save", "built without state I/O (BNORM_STATE_IO=OFF)");
}

bnorm_status bnorm_layer_load(bnorm_layer *layer, const char *path, const char *prefix) {
    (void)layer; (void)path; (void)prefix;
    return bn_fail(BNORM_STATUS_UNSUPPORTED, "bnorm_layer_load", "built without state I/O (BNORM_STATE_IO=OFF)");
}
