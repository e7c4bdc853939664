# The fused ReLU(BN(x) + addend) at z == 0 and with NaN inputs.
bnorm_add_test(test_fused test_fused.c)
