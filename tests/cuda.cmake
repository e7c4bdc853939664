# cuda.cmake - the CUDA backend's tests (only with -DBNORM_CUDA=ON). Each compares the GPU with the CPU
# backend on the same inputs; without a usable GPU each prints "SKIP: ..." and exits 77, which ctest
# reports as skipped (not passed). scripts/gpu_check.sh runs them on a GPU machine, some under
# compute-sanitizer.
find_package(Threads)

# The CPU emulation (tests/cuda_emu, -DBNORM_CUDA_EMULATE=ON): src/cuda/backend.cu and its kernels
# compiled as C++ against a stand-in CUDA runtime (threads of a block as fibers, blocks in sequence),
# linked with the CPU library, and test_cuda / test_cuda_sync run on it. It checks the kernels'
# indexing, reductions, masks and the host logic everywhere; not races or speed.
if(BNORM_CUDA_EMULATE)
  enable_language(CXX)
  add_library(bnorm_cuda_emu STATIC $<TARGET_OBJECTS:bnorm_obj> ${BNORM_CPU_KERNEL_OBJECTS} cuda_emu/backend_emu.cpp cuda_emu/emu.cpp)
  target_include_directories(bnorm_cuda_emu BEFORE PUBLIC ${CMAKE_CURRENT_SOURCE_DIR}/cuda_emu/include)
  target_include_directories(bnorm_cuda_emu PUBLIC ${PROJECT_SOURCE_DIR}/include ${BNORM_GENERATED_INCLUDE}
                             PRIVATE ${PROJECT_SOURCE_DIR}/src)
  set_target_properties(bnorm_cuda_emu PROPERTIES CXX_STANDARD 17 CXX_STANDARD_REQUIRED ON)
  target_link_libraries(bnorm_cuda_emu PUBLIC m Threads::Threads)
  if(BNORM_OPENMP)
    target_link_libraries(bnorm_cuda_emu PUBLIC OpenMP::OpenMP_C)
  endif()
  foreach(t test_cuda test_cuda_sync)
    add_executable(${t}_emu ${t}.c)
    target_link_libraries(${t}_emu PRIVATE bnorm_testlib bnorm_cuda_emu)
    add_test(NAME ${t}_emu COMMAND ${t}_emu)
    # fibers are slow: 3 random cases per dtype (plus every fixed and edge case) keep it near a minute
    set_tests_properties(${t}_emu PROPERTIES TIMEOUT 600 LABELS cuda_emu ENVIRONMENT "BNORM_TEST_CUDA_CASES=3")
  endforeach()
endif()

if(NOT BNORM_CUDA)
  return()
endif()
foreach(t test_cuda test_cuda_sync)
  bnorm_add_test(${t} ${t}.c)
  target_link_libraries(${t} PRIVATE CUDA::cudart_static Threads::Threads)
  set_tests_properties(${t} PROPERTIES SKIP_RETURN_CODE 77 TIMEOUT 150 LABELS cuda)
endforeach()

# bnorm_cuda.h is strict C99 and usable without <cuda_runtime.h>; the shared libbnorm exports the
# CUDA entry points and loads (and answers) on a machine without a GPU or driver. Runs everywhere.
add_executable(test_cuda_c99 test_cuda_c99.c)
target_link_libraries(test_cuda_c99 PRIVATE bnorm)
set_target_properties(test_cuda_c99 PROPERTIES C_STANDARD 99 C_STANDARD_REQUIRED ON C_EXTENSIONS OFF)
if(CMAKE_C_COMPILER_ID MATCHES "GNU|Clang")
  target_compile_options(test_cuda_c99 PRIVATE -std=c99 -pedantic -Werror -Wall -Wextra)
endif()
add_test(NAME test_cuda_c99 COMMAND test_cuda_c99)
if(BNORM_NCCL)
  bnorm_add_test(test_cuda_nccl test_cuda_nccl.c)
  target_link_libraries(test_cuda_nccl PRIVATE bnorm_nccl CUDA::cudart_static)
  set_tests_properties(test_cuda_nccl PROPERTIES SKIP_RETURN_CODE 77 TIMEOUT 120 LABELS cuda)
endif()
