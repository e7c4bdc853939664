// consumer.cpp - a C++-only project (no C compiler enabled) using the installed bnorm, shared and static.
#include <bnorm/bnorm.h>

#include <cmath>
#include <cstdio>
#include <vector>

#ifdef _OPENMP
#error "bnorm's package leaked -fopenmp into a consumer's compile flags"
#endif

int main() {
    std::vector<double> x = {1, 2, 3, 4, 5, 6, 7, 8}, y(8);
    bnorm_desc d = {};
    d.dtype = BNORM_DTYPE_F64;
    d.layout = BNORM_LAYOUT_CHANNELS_FIRST;
    d.rank = 2;
    d.dims[0] = 4;
    d.dims[1] = 2;
    bnorm_forward_args a = {};
    a.desc = d;
    a.x = x.data();
    a.y = y.data();
    a.training = 1;
    if (bnorm_forward(&a) != BNORM_STATUS_OK) {
        std::fprintf(stderr, "consumer_cxx: %s\n", bnorm_last_error());
        return 1;
    }
    // channel 1 holds 2,4,6,8: mean 5, biased var 5
    if (std::fabs(y[1] - (2 - 5) / std::sqrt(5.0)) > 1e-12 || bnorm_version() != BNORM_VERSION) {
        std::fprintf(stderr, "consumer_cxx: y[1] = %g, version %u\n", y[1], bnorm_version());
        return 1;
    }
    std::printf("consumer_cxx: bnorm %s works from C++\n", bnorm_version_string());
    return 0;
}
