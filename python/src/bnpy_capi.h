/*
 * bnpy_capi.h - what bnorm._bnorm hands to the package's other native modules (bnorm._autograd) in
 * the capsule "bnorm._bnorm._C_API": the library's entry points from the one copy of libbnorm that
 * the extension links, so that thread and instruction-set settings (bnorm.set_num_threads, set_isa)
 * apply to every call. Not a public interface; version grows with the struct.
 */
#ifndef BNPY_CAPI_H
#define BNPY_CAPI_H

#include <bnorm/bnorm.h>

#define BNPY_CAPI_NAME "bnorm._bnorm._C_API"
#define BNPY_CAPI_VERSION 1

typedef struct bnpy_capi {
    unsigned version; /* BNPY_CAPI_VERSION */
    bnorm_status (*backward)(const bnorm_backward_args *args);
    const char *(*last_error)(void);
} bnpy_capi;

#endif
