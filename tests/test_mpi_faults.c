/*
 * test_mpi_faults.c - faults of the one-collective mode (validate = 0) with real MPI processes
 * (issue 18, items 8 and 9), in a program of their own because on a library that gets them wrong the
 * whole job dies or hangs. Run by mpirun with 2 and 3 ranks.
 *   - A different C on rank 0 makes the data all-gathers differ in size: MPI reports a truncation. The
 *     library must turn that into an error on every rank (BNORM_STATUS_COMM or COMM_MISMATCH), write
 *     nothing, and the job must go on (it used to abort inside MPI_Test under MPI_ERRORS_ARE_FATAL).
 *   - A straggler: every rank but the last times out in the all-gather; then the last rank calls. It
 *     must not complete the others' pending all-gather alone and report success: it fails too, writes
 *     nothing, and every rank's communicator is then marked unusable and says so on the next call.
 * Ranks print only failures; rank 0 prints "N passed, N failed" over all ranks.
 */
#include "bnorm/bnorm_mpi.h"

#include "harness.h"

static int g_rank, g_size;

typedef struct fstate {
    double y[128], rm[8], rv[8], sm[8], si[8];
} fstate;

/* A training forward with running statistics whose outputs start poisoned, so that any write shows. */
static bnorm_status poisoned_forward(const bnorm_desc *d, const bnorm_comm *comm, fstate *s, const double *x) {
    memset(s, 0x5A, sizeof *s);
    bnorm_forward_args a = {.desc = *d, .x = x, .y = s->y, .eps = 1e-5, .training = 1, .running_mean = s->rm,
                            .running_var = s->rv, .momentum = 0.1, .save_mean = s->sm, .save_invstd = s->si,
                            .comm = comm};
    return bnorm_forward(&a);
}
static int untouched(const fstate *s) {
    fstate p;
    memset(&p, 0x5A, sizeof p);
    return memcmp(&p, s, sizeof p) == 0;
}

static bnorm_comm *make_comm(double timeout) {
    bnorm_mpi_options o = bnorm_mpi_options_default();
    o.timeout_seconds = timeout;
    o.validate = 0;
    bnorm_comm *c = NULL;
    CHECK_STATUS(bnorm_mpi_comm_create(MPI_COMM_WORLD, &o, &c), BNORM_STATUS_OK);
    return c;
}

/* Item 8: a C mismatch without the validation exchange. */
static void test_c_mismatch(void) {
    bnorm_comm *c = make_comm(3.0);
    if (!c) return;
    double x[128];
    for (int i = 0; i < 128; i++) x[i] = th_normal();
    const int64_t C = g_rank == 0 ? 3 : 8; /* rank 0 sends and expects far fewer doubles */
    bnorm_desc d = {.dtype = BNORM_DTYPE_F64, .layout = BNORM_LAYOUT_CHANNELS_FIRST, .rank = 3, .dims = {2, C, 4}};
    fstate s;
    bnorm_status st = poisoned_forward(&d, c, &s, x);
    CHECK(st == BNORM_STATUS_COMM || st == BNORM_STATUS_COMM_MISMATCH, "[rank %d] C mismatch: %s (%s)", g_rank,
          bnorm_status_string(st), bnorm_last_error());
    if (getenv("BNORM_TEST_VERBOSE")) printf("[rank %d] C mismatch: %s\n", g_rank, bnorm_last_error());
    CHECK(untouched(&s), "[rank %d] C mismatch wrote outputs", g_rank);
    if (st == BNORM_STATUS_COMM)
        CHECK(bnorm_mpi_comm_is_poisoned(c), "[rank %d] an MPI error did not mark the communicator", g_rank);
    MPI_Errhandler eh;
    MPI_Comm_get_errhandler(MPI_COMM_WORLD, &eh);
    CHECK(eh == MPI_ERRORS_ARE_FATAL, "[rank %d] the application's error handler was not put back", g_rank);
    MPI_Errhandler_free(&eh);
    MPI_Barrier(MPI_COMM_WORLD); /* the job is alive on every rank */
    bnorm_mpi_comm_destroy(c);
}

/* Item 9: the last rank arrives after the others timed out. */
static void test_straggler(void) {
    const double limit = 0.5;
    bnorm_comm *c = make_comm(limit);
    if (!c) return;
    const int late = g_rank == g_size - 1;
    double x[12];
    for (int i = 0; i < 12; i++) x[i] = i + g_rank;
    bnorm_desc d = {.dtype = BNORM_DTYPE_F64, .layout = BNORM_LAYOUT_CHANNELS_FIRST, .rank = 2, .dims = {4, 3}};
    fstate s;
    if (!late) {
        CHECK_STATUS(poisoned_forward(&d, c, &s, x), BNORM_STATUS_COMM);
        CHECK(strstr(bnorm_last_error(), "timed out") != NULL, "[rank %d] message: %s", g_rank, bnorm_last_error());
        CHECK(untouched(&s), "[rank %d] a timed-out forward wrote outputs", g_rank);
    }
    MPI_Barrier(MPI_COMM_WORLD);
    if (late) {
        bnorm_status st = poisoned_forward(&d, c, &s, x);
        CHECK(st == BNORM_STATUS_COMM, "[rank %d] the straggler got %s (%s) although every other rank failed",
              g_rank, bnorm_status_string(st), bnorm_last_error());
        CHECK(untouched(&s), "[rank %d] the straggler's forward wrote outputs (running statistics moved)", g_rank);
    }
    MPI_Barrier(MPI_COMM_WORLD);
    /* every rank: the communicator is marked unusable and says so at once */
    CHECK(bnorm_mpi_comm_is_poisoned(c), "[rank %d] not marked unusable", g_rank);
    double t0 = MPI_Wtime();
    CHECK_STATUS(poisoned_forward(&d, c, &s, x), BNORM_STATUS_COMM);
    CHECK(MPI_Wtime() - t0 < limit, "[rank %d] an unusable communicator waited again", g_rank);
    CHECK(strstr(bnorm_last_error(), "unusable") != NULL, "[rank %d] message: %s", g_rank, bnorm_last_error());
    CHECK(untouched(&s), "[rank %d] a call on an unusable communicator wrote outputs", g_rank);
    MPI_Barrier(MPI_COMM_WORLD);
    bnorm_mpi_comm_destroy(c);
}

/* The same communicator settings without faults: steps still succeed, also many in a row. */
static void test_healthy(void) {
    bnorm_comm *c = make_comm(5.0);
    if (!c) return;
    double x[12];
    for (int i = 0; i < 12; i++) x[i] = i * 0.5 + g_rank;
    bnorm_desc d = {.dtype = BNORM_DTYPE_F64, .layout = BNORM_LAYOUT_CHANNELS_FIRST, .rank = 2, .dims = {4, 3}};
    fstate s;
    for (int k = 0; k < 50; k++) CHECK_STATUS(poisoned_forward(&d, c, &s, x), BNORM_STATUS_OK);
    CHECK(!bnorm_mpi_comm_is_poisoned(c), "[rank %d] healthy communicator marked", g_rank);
    bnorm_mpi_comm_destroy(c);
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &g_rank);
    MPI_Comm_size(MPI_COMM_WORLD, &g_size);
    th_seed(0x6661756c74ull + (uint64_t)g_rank);
    if (g_size >= 2) {
        test_healthy();
        test_c_mismatch();
        test_straggler();
        test_healthy();
    }
    long mine[2] = {th_passed, th_failed}, sum[2] = {0, 0};
    MPI_Reduce(mine, sum, 2, MPI_LONG, MPI_SUM, 0, MPI_COMM_WORLD);
    long any = th_failed, anyall = 0;
    MPI_Allreduce(&any, &anyall, 1, MPI_LONG, MPI_MAX, MPI_COMM_WORLD);
    if (g_rank == 0) printf("test_mpi_faults (%d ranks): %ld passed, %ld failed\n", g_size, sum[0], sum[1]);
    MPI_Finalize();
    return anyall ? 1 : 0;
}
