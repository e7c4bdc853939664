/* no_state_io.c - stands in for safetensors.c when the library is built without state I/O (BNORM_STATE_IO=OFF). */
#include "../core/internal.h"

bnorm_status bnorm_layer_save(const bnorm_layer *layer, const char *path, const char *prefix) {
    (void)layer; (void)path; (void)prefix;
    return bn_fail(BNORM_STATUS_UNSUPPORTED, "bnorm_layer_save", "built without state I/O (BNORM_STATE_IO=OFF)");
}

bnorm_status bnorm_layer_load(bnorm_layer *layer, const char *path, const char *prefix) {
    (void)layer; (void)path; (void)prefix;
    return bn_fail(BNORM_STATUS_UNSUPPORTED, "bnorm_layer_load", "built without state I/O (BNORM_STATE_IO=OFF)");
}

bnorm_status bnorm_state_list(const char *path, bnorm_state_entry **entries, size_t *count) {
    (void)path;
    if (entries) *entries = NULL;
    if (count) *count = 0;
    return bn_fail(BNORM_STATUS_UNSUPPORTED, "bnorm_state_list", "built without state I/O (BNORM_STATE_IO=OFF)");
}

void bnorm_state_list_free(bnorm_state_entry *entries) { (void)entries; }
