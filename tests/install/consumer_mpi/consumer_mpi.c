/* consumer_mpi.c - the installed MPI component: every rank normalizes its half of a batch with a
 * synchronized layer and checks that it got the statistics of the whole batch. */
#include <bnorm/bnorm_mpi.h>
#include <math.h>
#include <stdio.h>

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    int rank, size, bad = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    /* the global batch is 0, 1, ..., 2*size-1 (one channel); rank r holds 2r and 2r+1 */
    float x[2] = {(float)(2 * rank), (float)(2 * rank + 1)}, y[2];
    bnorm_desc d = {.dtype = BNORM_DTYPE_F32, .layout = BNORM_LAYOUT_CHANNELS_FIRST, .rank = 2, .dims = {2, 1}};
    bnorm_comm *comm = NULL;
    bnorm_forward_args a = {.desc = d, .x = x, .y = y, .eps = 0, .training = 1};
    if (bnorm_mpi_comm_create(MPI_COMM_WORLD, NULL, &comm) != BNORM_STATUS_OK) {
        fprintf(stderr, "consumer_mpi: %s\n", bnorm_mpi_last_error());
        bad = 1;
    } else {
        a.comm = comm;
        if (bnorm_forward(&a) != BNORM_STATUS_OK) {
            fprintf(stderr, "consumer_mpi: %s\n", bnorm_last_error());
            bad = 1;
        }
    }
    double n = 2.0 * size, mean = (n - 1) / 2, var = (n * n - 1) / 12;
    if (!bad && fabs(y[0] - (x[0] - mean) / sqrt(var)) > 1e-5) {
        fprintf(stderr, "consumer_mpi: rank %d y[0] = %g\n", rank, y[0]);
        bad = 1;
    }
    bnorm_mpi_comm_destroy(comm);
    int any = 0;
    MPI_Allreduce(&bad, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    if (rank == 0 && !any) printf("consumer_mpi: bnorm %s synchronized over %d ranks\n", bnorm_version_string(), size);
    MPI_Finalize();
    return any;
}
