/* cuda_fp16.h - the CPU emulation's stand-in (../cuda_emu.h). */
#include "../cuda_emu.h"
