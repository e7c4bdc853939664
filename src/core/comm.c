/* comm.c - the exchange of synchronized batch norm over a bnorm_comm, shared by the backends: the
 * header that makes disagreeing ranks fail with COMM_MISMATCH, and the all-gather around it. The
 * backends build the payload (forward: count, means, M2; backward: count, two sums) and merge what
 * comes back in rank order. (The CPU driver keeps its own identical copy until issue 16's seam.) */
#include "internal.h"

enum { BN_COMM_MAGIC = 0x626e6f72 };

void bn_comm_header(double *h, int op, const bnorm_desc *d, int flags) {
    h[0] = BN_COMM_MAGIC;
    h[1] = op;
    h[2] = (double)d->dims[1];
    h[3] = d->dtype;
    h[4] = d->layout;
    h[5] = flags;
    h[6] = 0;
    h[7] = 0;
}

/* Checks that every rank's header (at stride `stride` in recv) equals ours. */
static bnorm_status bn_comm_compare(const char *func, const bnorm_comm *c, const double *recv, size_t stride,
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
        bnorm_status st = bn_comm_compare(func, c, recv, BN_COMM_HDR, send);
        if (st) return st;
    }
    msg[0] = '\0';
    if (c->allgather(c->ctx, send, (int64_t)count, recv, msg, sizeof msg) != 0)
        return bn_fail(BNORM_STATUS_COMM, func, "all-gather failed: %s", msg[0] ? msg : "(no message)");
    return bn_comm_compare(func, c, recv, count, send);
}
