# cuda.cmake - the CUDA backend's tests (only with -DBNORM_CUDA=ON). Each compares the GPU with the CPU
# backend on the same inputs; without a usable GPU each prints "SKIP: ..." and exits 77, which ctest
# reports as skipped (not passed). scripts/gpu_check.sh runs them on a GPU machine, some under
# compute-sanitizer.
if(NOT BNORM_CUDA)
  return()
endif()

find_package(Threads REQUIRED)
foreach(t test_cuda test_cuda_sync)
  bnorm_add_test(${t} ${t}.c)
  target_link_libraries(${t} PRIVATE CUDA::cudart_static Threads::Threads)
  set_tests_properties(${t} PROPERTIES SKIP_RETURN_CODE 77 TIMEOUT 300 LABELS cuda)
endforeach()
if(BNORM_NCCL)
  bnorm_add_test(test_cuda_nccl test_cuda_nccl.c)
  target_link_libraries(test_cuda_nccl PRIVATE bnorm_nccl CUDA::cudart_static)
  set_tests_properties(test_cuda_nccl PROPERTIES SKIP_RETURN_CODE 77 TIMEOUT 120 LABELS cuda)
endif()
