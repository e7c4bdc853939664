/*
 * fuzz_safetensors.c - libFuzzer target for the safetensors loader (built by tests/state.cmake with
 * clang -fsanitize=fuzzer,address,undefined). Each input is a whole file: it is listed, every layer
 * the listing reports is created and loaded (the success path), and fixed layers are loaded under a
 * few prefixes (the error paths). A load that fails must leave the layer bit for bit as it was.
 */
#include "layer/layer_internal.h"

#include <stdlib.h>

/* internal entry points of src/io/safetensors.c that read from memory instead of a path */
bnorm_status bn_safetensors_load_mem(bnorm_layer *layer, const void *data, size_t size, const char *prefix);
bnorm_status bn_safetensors_list_mem(const void *data, size_t size, bnorm_state_entry **entries, size_t *count);

static void load_checked(bnorm_layer *l, const uint8_t *data, size_t size, const char *prefix) {
    const size_t bytes = 8 * (size_t)l->opt.num_features * bnorm_dtype_size(l->opt.param_dtype);
    unsigned char *before = (unsigned char *)malloc(bytes);
    bnorm_layer_options o = l->opt;
    int64_t nbt = l->num_batches_tracked;
    memcpy(before, l->block, bytes);
    if (bn_safetensors_load_mem(l, data, size, prefix) != BNORM_STATUS_OK &&
        (memcmp(before, l->block, bytes) != 0 || memcmp(&o, &l->opt, sizeof o) != 0 || nbt != l->num_batches_tracked))
        __builtin_trap(); /* a failed load changed the layer */
    free(before);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    bnorm_state_entry *e = NULL;
    size_t n = 0;
    if (bn_safetensors_list_mem(data, size, &e, &n) == BNORM_STATUS_OK) {
        for (size_t i = 0; i < n && i < 8; i++) {
            bnorm_layer *l = NULL;
            if (e[i].options.num_features > 4096) continue;
            if (bnorm_layer_create(&e[i].options, &l) != BNORM_STATUS_OK) __builtin_trap();
            if (bn_safetensors_load_mem(l, data, size, e[i].prefix) != BNORM_STATUS_OK) __builtin_trap();
            bnorm_layer_destroy(l);
        }
        bnorm_state_list_free(e);
    }
    static const char *prefixes[] = {"", "bn.", "layer1.0.bn1."};
    for (int i = 0; i < 3; i++)
        for (int pd = 0; pd < 2; pd++) {
            bnorm_layer_options o = bnorm_layer_options_default(2 + i);
            o.param_dtype = pd ? BNORM_DTYPE_F64 : BNORM_DTYPE_F32;
            o.affine = i != 1;
            bnorm_layer *l = NULL;
            if (bnorm_layer_create(&o, &l) != BNORM_STATUS_OK) __builtin_trap();
            load_checked(l, data, size, prefixes[i]);
            bnorm_layer_destroy(l);
        }
    return 0;
}
