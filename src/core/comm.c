/* comm.c - the communicator protocol shared by every backend: a header of 8 doubles (protocol, op, C,
 * dtype, layout, mode flags) travels in front of each payload, so ranks that disagree get
 * BNORM_STATUS_COMM_MISMATCH instead of mixing unrelated data. */
#include "internal.h"

enum { BN_MAGIC = 0x626e6f72 };

bnorm_status bn_comm_check(const char *func, const bnorm_comm *c) {
    if (c->size < 1 || c->rank < 0 || c->rank >= c->size)
        return bn_fail(BNORM_STATUS_INVALID_ARGUMENT, func, "comm rank = %d, size = %d: need 0 <= rank < size",
                       c->rank, c->size);
    if (c->size > (1 << 20))
        return bn_fail(BNORM_STATUS_INVALID_ARGUMENT, func, "comm size = %d: at most %d ranks", c->size, 1 << 20);
    if (!c->allgather) return bn_fail(BNORM_STATUS_NULL_POINTER, func, "comm->allgather is NULL");
    return BNORM_STATUS_OK;
}

void bn_comm_header(double *h, int op, const bnorm_desc *d, int flags) {
    h[0] = BN_MAGIC;
    h[1] = op;
    h[2] = (double)d->dims[1];
    h[3] = d->dtype;
    h[4] = d->layout;
    h[5] = flags;
    h[6] = 0;
    h[7] = 0;
}

/* Checks that every rank's header (at stride `stride` in recv) equals ours. */
static bnorm_status bn_compare_headers(const char *func, const bnorm_comm *c, const double *recv, size_t stride,
                                       const double *mine) {
    static const char *what[BN_COMM_HDR] = {"protocol", "operation (forward/backward)", "C", "dtype", "layout",
                                       "mode flags", "reserved", "reserved"};
    for (int r = 0; r < c->size; r++) {
        const double *h = recv + (size_t)r * stride;
        for (int i = 0; i < BN_COMM_HDR; i++)
            if (h[i] != mine[i])
                return bn_fail(BNORM_STATUS_COMM_MISMATCH, func,
                               "rank %d and rank %d disagree on the %s (%g vs %g): every rank must make "
                               "the same call with the same C, dtype, layout and mode",
                               c->rank, r, what[i], mine[i], h[i]);
    }
    return BNORM_STATUS_OK;
}

bnorm_status bn_comm_exchange(const char *func, const bnorm_comm *c, double *send, size_t count, double *recv) {
    char msg[512];
    if (c->validate) {
        msg[0] = '\0';
        if (c->allgather(c->ctx, send, BN_COMM_HDR, recv, msg, sizeof msg) != 0)
            return bn_fail(BNORM_STATUS_COMM, func, "all-gather failed: %s", msg[0] ? msg : "(no message)");
        bnorm_status st = bn_compare_headers(func, c, recv, BN_COMM_HDR, send);
        if (st) return st;
    }
    msg[0] = '\0';
    if (c->allgather(c->ctx, send, (int64_t)count, recv, msg, sizeof msg) != 0)
        return bn_fail(BNORM_STATUS_COMM, func, "all-gather failed: %s", msg[0] ? msg : "(no message)");
    return bn_compare_headers(func, c, recv, count, send);
}
