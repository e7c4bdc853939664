/* backend_emu.cpp - src/cuda/backend.cu (and its kernels) compiled as plain C++ against the CPU
 * emulation of CUDA (cuda_emu.h): the same source the GPU runs. */
#include "../../src/cuda/backend.cu"
