/* error.c - status strings and the thread-local message behind bnorm_last_error(). */
#include "internal.h"

#include <stdio.h>

static _Thread_local char bn_message[1024];

const char *bnorm_status_string(bnorm_status status) {
    switch (status) {
#define BNORM_STATUS_CASE(name, value, text) \
    case name: return text;
        BNORM_STATUS_LIST(BNORM_STATUS_CASE)
#undef BNORM_STATUS_CASE
    }
    return "unknown status";
}

const char *bnorm_last_error(void) { return bn_message; }

void bn_clear_error(void) { bn_message[0] = '\0'; }

bnorm_status bn_fail(bnorm_status status, const char *func, const char *fmt, ...) {
    int k = snprintf(bn_message, sizeof bn_message, "%s: ", func);
    if (k < 0 || (size_t)k >= sizeof bn_message) return status;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(bn_message + k, sizeof bn_message - (size_t)k, fmt, ap);
    va_end(ap);
    return status;
}

const char *bnorm_version_string(void) { return BNORM_VERSION_STRING; }

unsigned bnorm_version(void) { return BNORM_VERSION; }

bnorm_status bn_error_reprefix(const char *func, bnorm_status status) {
    if (status == BNORM_STATUS_OK) return status;
    size_t k = strlen(func), n = strlen(bn_message);
    if (strncmp(bn_message, func, k) == 0 && bn_message[k] == ':') return status;
    if (n + k + 2 >= sizeof bn_message) n = sizeof bn_message - k - 3;
    memmove(bn_message + k + 2, bn_message, n);
    memcpy(bn_message, func, k);
    bn_message[k] = ':';
    bn_message[k + 1] = ' ';
    bn_message[n + k + 2] = '\0';
    return status;
}
