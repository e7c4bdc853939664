/*
 * mpi_comm.c - the bnorm_comm over MPI (bnorm_mpi.h): an all-gather of doubles on a private duplicate
 * of the user's communicator, bounded by a timeout so that a missing rank is an error, not a hang.
 *
 * The driver hands us send/recv buffers that live only for the duration of its call. MPI_Iallgather
 * works on buffers owned by this object instead: if a collective times out it stays pending (MPI cannot
 * cancel a collective), and MPI may write into its receive buffer whenever the late rank shows up, long
 * after the driver's buffers are gone. Such a communicator is poisoned: no further collective is
 * posted, and its buffers are never reused or freed.
 *
 * A rank that arrives after the others timed out would complete their pending all-gather alone. So,
 * with a timeout, a completed all-gather is confirmed by an MPI_Ibarrier under the same timeout before
 * its data is handed over: a rank that gave up never posts that barrier, and the straggler times out on
 * it instead of reporting success.
 *
 * Errors: the duplicate has MPI_ERRORS_RETURN, but Open MPI raises the errors of nonblocking
 * collective requests (MPI_Test, MPI_Wait) on MPI_COMM_WORLD's handler, fatal by default. Every MPI
 * call on a request is therefore made with MPI_COMM_WORLD's handler set to MPI_ERRORS_RETURN and the
 * application's handler put back right after.
 */
#define _POSIX_C_SOURCE 200809L
#define BNORM_MPI_BUILDING

#include "bnorm/bnorm_mpi.h"

#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct bn_mpi {
    bnorm_comm pub;       /* handed to the user; pub.ctx points back here */
    MPI_Comm comm;        /* the private duplicate */
    double timeout;       /* seconds; 0 = none */
    double *sbuf, *rbuf;  /* owned staging buffers */
    size_t scap, rcap;    /* capacities in doubles */
    MPI_Request pending;  /* the collective that timed out or failed (poisoned), else MPI_REQUEST_NULL */
    int poisoned;
    char poison_msg[512];
} bn_mpi;

static _Thread_local char bn_mpi_message[1024];

const char *bnorm_mpi_last_error(void) { return bn_mpi_message; }

static bnorm_status bn_mpi_fail(bnorm_status st, const char *fmt, ...) {
    int k = snprintf(bn_mpi_message, sizeof bn_mpi_message, "bnorm_mpi_comm_create: ");
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(bn_mpi_message + k, sizeof bn_mpi_message - (size_t)k, fmt, ap);
    va_end(ap);
    return st;
}

/* "MPI_Xxx failed: <MPI's text> (error class N)" into msg. */
static void bn_mpi_error_text(char *msg, size_t cap, const char *what, int code) {
    char text[MPI_MAX_ERROR_STRING];
    int len = 0, cls = code;
    if (MPI_Error_string(code, text, &len) != MPI_SUCCESS) snprintf(text, sizeof text, "unknown MPI error");
    MPI_Error_class(code, &cls);
    if (msg && cap) snprintf(msg, cap, "%s failed: %s (MPI error class %d)", what, text, cls);
}

static void bn_mpi_poison(bn_mpi *m, MPI_Request req, const char *msg) {
    m->poisoned = 1;
    m->pending = req;
    snprintf(m->poison_msg, sizeof m->poison_msg, "%s", msg);
}

static int bn_mpi_grow(double **p, size_t *cap, size_t need) {
    if (need <= *cap) return 0;
    double *q = malloc(need * sizeof(double));
    if (!q) return -1;
    free(*p);
    *p = q;
    *cap = need;
    return 0;
}

/* MPI_COMM_WORLD's error handler, switched to MPI_ERRORS_RETURN while the library waits on its requests
 * (see the top of the file) and restored by bn_mpi_eh_leave. */
typedef struct bn_mpi_eh {
    MPI_Errhandler saved;
    int swapped;
} bn_mpi_eh;

static void bn_mpi_eh_enter(bn_mpi_eh *e) {
    e->swapped = MPI_Comm_get_errhandler(MPI_COMM_WORLD, &e->saved) == MPI_SUCCESS;
    if (e->swapped && MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN) != MPI_SUCCESS) {
        MPI_Errhandler_free(&e->saved);
        e->swapped = 0;
    }
}

static void bn_mpi_eh_leave(bn_mpi_eh *e) {
    if (!e->swapped) return;
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, e->saved);
    MPI_Errhandler_free(&e->saved);
    e->swapped = 0;
}

/* Waits for req: spin on MPI_Test briefly (balanced ranks finish in microseconds), then sleep in
 * growing steps up to 1 ms so that waiting ranks leave the cores to the ones still computing. */
static int bn_mpi_wait(bn_mpi *m, MPI_Request *req, int *timed_out) {
    *timed_out = 0;
    if (m->timeout <= 0) return MPI_Wait(req, MPI_STATUS_IGNORE);
    const double t0 = MPI_Wtime();
    long sleep_ns = 2000;
    for (;;) {
        int done = 0;
        int rc = MPI_Test(req, &done, MPI_STATUS_IGNORE);
        if (rc != MPI_SUCCESS || done) return rc;
        double el = MPI_Wtime() - t0;
        if (el >= m->timeout) {
            *timed_out = 1;
            return MPI_SUCCESS;
        }
        if (el > 1e-4) {
            struct timespec ts = {0, sleep_ns};
            nanosleep(&ts, NULL);
            if (sleep_ns < 1000000) sleep_ns *= 2;
        }
    }
}

/* The all-gather proper, with MPI_COMM_WORLD's handler already switched (bn_mpi_allgather). */
static int bn_mpi_allgather_step(bn_mpi *m, int64_t count, char *msg, size_t msg_cap) {
    const int size = m->pub.size;
    char text[512];
    MPI_Request req = MPI_REQUEST_NULL;
    int rc = MPI_Iallgather(m->sbuf, (int)count, MPI_DOUBLE, m->rbuf, (int)count, MPI_DOUBLE, m->comm, &req);
    if (rc != MPI_SUCCESS) {
        bn_mpi_error_text(text, sizeof text, "MPI_Iallgather", rc);
        goto poison;
    }
    int timed_out = 0;
    rc = bn_mpi_wait(m, &req, &timed_out);
    if (rc != MPI_SUCCESS) {
        bn_mpi_error_text(text, sizeof text, m->timeout > 0 ? "MPI_Test" : "MPI_Wait", rc);
        goto poison;
    }
    if (timed_out) {
        snprintf(text, sizeof text,
                 "rank %d of %d timed out after %g s in the all-gather of %lld doubles: at least one rank of the "
                 "group did not make the same call (every rank must call forward/backward in the same order, "
                 "also with an empty batch); the communicator is now unusable",
                 m->pub.rank, size, m->timeout, (long long)count);
        goto poison;
    }
    if (m->timeout <= 0) return 0; /* nobody gives up, so nobody can be left behind */
    /* Confirmation: every rank that completed the all-gather in time posts a barrier. A rank that
     * timed out posts nothing more, so a straggler that completed the others' pending all-gather
     * alone times out here, and the step fails on every rank. */
    rc = MPI_Ibarrier(m->comm, &req);
    if (rc != MPI_SUCCESS) {
        bn_mpi_error_text(text, sizeof text, "MPI_Ibarrier", rc);
        goto poison;
    }
    rc = bn_mpi_wait(m, &req, &timed_out);
    if (rc != MPI_SUCCESS) {
        bn_mpi_error_text(text, sizeof text, "MPI_Test (confirmation barrier)", rc);
        goto poison;
    }
    if (timed_out) {
        snprintf(text, sizeof text,
                 "rank %d of %d: the all-gather of %lld doubles completed here but the group did not confirm it "
                 "within %g s: another rank failed or gave up on this step (an MPI error, a timeout, or it "
                 "arrived after the others had timed out); this step failed and the communicator is now unusable",
                 m->pub.rank, size, (long long)count, m->timeout);
        goto poison;
    }
    return 0;
poison:
    if (msg && msg_cap) snprintf(msg, msg_cap, "%s", text);
    bn_mpi_poison(m, req, text);
    return 1;
}

static int bn_mpi_allgather(void *ctx, const double *send, int64_t count, double *recv, char *msg,
                            size_t msg_cap) {
    bn_mpi *m = ctx;
    const int size = m->pub.size;
    if (m->poisoned) {
        if (msg && msg_cap)
            snprintf(msg, msg_cap, "this MPI communicator is unusable after an earlier failure (%s); destroy it",
                     m->poison_msg);
        return 1;
    }
    if (count < 0 || count > INT_MAX || (size_t)count > SIZE_MAX / sizeof(double) / (size_t)size) {
        if (msg && msg_cap)
            snprintf(msg, msg_cap, "all-gather of %lld doubles per rank over %d ranks does not fit MPI's int counts",
                     (long long)count, size);
        return 1;
    }
    if (count > 0 && (!send || !recv)) {
        if (msg && msg_cap) snprintf(msg, msg_cap, "all-gather called with a NULL buffer");
        return 1;
    }
    const size_t n = (size_t)count;
    if (bn_mpi_grow(&m->sbuf, &m->scap, n ? n : 1) || bn_mpi_grow(&m->rbuf, &m->rcap, n * (size_t)size + 1)) {
        if (msg && msg_cap) snprintf(msg, msg_cap, "out of memory for the all-gather staging buffers");
        return 1;
    }
    if (n) memcpy(m->sbuf, send, n * sizeof(double));
    bn_mpi_eh eh;
    bn_mpi_eh_enter(&eh);
    int bad = bn_mpi_allgather_step(m, count, msg, msg_cap);
    bn_mpi_eh_leave(&eh);
    if (bad) return 1;
    if (n) memcpy(recv, m->rbuf, n * (size_t)size * sizeof(double));
    return 0;
}

bnorm_mpi_options bnorm_mpi_options_default(void) {
    bnorm_mpi_options o = {.timeout_seconds = 600.0, .validate = 1};
    return o;
}

bnorm_status bnorm_mpi_comm_create(MPI_Comm comm, const bnorm_mpi_options *options, bnorm_comm **out) {
    bn_mpi_message[0] = '\0';
    if (!out) return bn_mpi_fail(BNORM_STATUS_NULL_POINTER, "out is NULL");
    *out = NULL;
    bnorm_mpi_options o = options ? *options : bnorm_mpi_options_default();
    if (!(o.timeout_seconds >= 0))
        return bn_mpi_fail(BNORM_STATUS_INVALID_ARGUMENT, "options->timeout_seconds = %g: must be >= 0 (0: no timeout)",
                           o.timeout_seconds);
    int flag = 0;
    MPI_Initialized(&flag);
    if (!flag) return bn_mpi_fail(BNORM_STATUS_STATE, "MPI is not initialized (call MPI_Init first)");
    MPI_Finalized(&flag);
    if (flag) return bn_mpi_fail(BNORM_STATUS_STATE, "MPI is already finalized");
    if (comm == MPI_COMM_NULL) return bn_mpi_fail(BNORM_STATUS_INVALID_ARGUMENT, "comm is MPI_COMM_NULL");
    int inter = 0, rc = MPI_Comm_test_inter(comm, &inter);
    if (rc != MPI_SUCCESS) {
        char text[512];
        bn_mpi_error_text(text, sizeof text, "MPI_Comm_test_inter", rc);
        return bn_mpi_fail(BNORM_STATUS_COMM, "%s", text);
    }
    if (inter) return bn_mpi_fail(BNORM_STATUS_INVALID_ARGUMENT, "comm is an intercommunicator: need an intracommunicator");
    bn_mpi *m = calloc(1, sizeof *m);
    if (!m) return bn_mpi_fail(BNORM_STATUS_OUT_OF_MEMORY, "out of memory");
    m->pending = MPI_REQUEST_NULL;
    m->timeout = isinf(o.timeout_seconds) ? 0.0 : o.timeout_seconds;
    rc = MPI_Comm_dup(comm, &m->comm);
    if (rc != MPI_SUCCESS) {
        char text[512];
        bn_mpi_error_text(text, sizeof text, "MPI_Comm_dup", rc);
        free(m);
        return bn_mpi_fail(BNORM_STATUS_COMM, "%s", text);
    }
    int rank = 0, size = 0;
    if ((rc = MPI_Comm_set_errhandler(m->comm, MPI_ERRORS_RETURN)) != MPI_SUCCESS ||
        (rc = MPI_Comm_rank(m->comm, &rank)) != MPI_SUCCESS || (rc = MPI_Comm_size(m->comm, &size)) != MPI_SUCCESS) {
        char text[512];
        bn_mpi_error_text(text, sizeof text, "setting up the duplicate communicator", rc);
        MPI_Comm_free(&m->comm);
        free(m);
        return bn_mpi_fail(BNORM_STATUS_COMM, "%s", text);
    }
    m->pub.rank = rank;
    m->pub.size = size;
    m->pub.validate = o.validate != 0;
    m->pub.allgather = bn_mpi_allgather;
    m->pub.ctx = m;
    *out = &m->pub;
    return BNORM_STATUS_OK;
}

/* Ours if it carries our callback; copies (a layer keeps one) share the context. */
static bn_mpi *bn_mpi_of(const bnorm_comm *c) {
    return (c && c->allgather == bn_mpi_allgather) ? (bn_mpi *)c->ctx : NULL;
}

int bnorm_mpi_comm_is_poisoned(const bnorm_comm *c) {
    const bn_mpi *m = bn_mpi_of(c);
    return m ? m->poisoned : 0;
}

void bnorm_mpi_comm_destroy(bnorm_comm *c) {
    bn_mpi *m = bn_mpi_of(c);
    if (!m || &m->pub != c) return; /* only the object create returned, not a copy */
    int fin = 0, leak = 0;
    MPI_Finalized(&fin);
    if (!fin) { /* after MPI_Finalize nothing can write the buffers any more, and MPI may not be called */
        if (m->pending != MPI_REQUEST_NULL) {
            /* the late rank may have arrived since: then the collective is over and its buffers free */
            int done = 0;
            bn_mpi_eh eh;
            bn_mpi_eh_enter(&eh);
            if (MPI_Test(&m->pending, &done, MPI_STATUS_IGNORE) != MPI_SUCCESS || !done) leak = 1;
            bn_mpi_eh_leave(&eh);
        }
        MPI_Comm_free(&m->comm);
    }
    if (leak) return; /* MPI may still write sbuf/rbuf; the struct is small and goes with them */
    free(m->sbuf);
    free(m->rbuf);
    free(m);
}
