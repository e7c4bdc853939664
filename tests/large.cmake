# large.cmake - the streaming-store paths (outputs >= 16 MiB) against the float64 reference.
bnorm_add_test(test_large test_large.c)
