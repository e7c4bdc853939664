# core.cmake - the core issue's remaining tests: hard data, gradient checks, the layer object, every
# error path, the float16/bfloat16 conversion kernels, and a C99 compile of the public header.
bnorm_add_test(test_hard test_hard.c)
bnorm_add_test(test_gradcheck test_gradcheck.c)
bnorm_add_test(test_layer test_layer.c)
bnorm_add_test(test_errors test_errors.c)
bnorm_add_test(test_convert test_convert.c)

# The public header must be strict C99: this program includes only bnorm/bnorm.h, is compiled with
# -std=c99 -pedantic and every warning an error, and links the shared library (exported symbols).
add_executable(test_c99 test_c99.c)
target_link_libraries(test_c99 PRIVATE bnorm)
set_target_properties(test_c99 PROPERTIES C_STANDARD 99 C_STANDARD_REQUIRED ON C_EXTENSIONS OFF)
if(CMAKE_C_COMPILER_ID MATCHES "GNU|Clang")
  target_compile_options(test_c99 PRIVATE -std=c99 -pedantic -Werror -Wall -Wextra)
endif()
add_test(NAME test_c99 COMMAND test_c99)

# Embedding (issue 16): plans, threads, pools, contexts, full precision, sizes. The OpenMP environment
# runs check that OMP_NUM_THREADS sets the default count; the verbose run checks BNORM_VERBOSE's line.
bnorm_add_test(test_embed test_embed.c)
find_package(Threads REQUIRED)
target_link_libraries(test_embed PRIVATE Threads::Threads)
if(BNORM_OPENMP)
  target_link_libraries(test_embed PRIVATE OpenMP::OpenMP_C)
  foreach(n 1 3)
    add_test(NAME test_embed_omp_env_${n} COMMAND test_embed omp-env ${n})
    set_tests_properties(test_embed_omp_env_${n} PROPERTIES ENVIRONMENT "OMP_NUM_THREADS=${n}")
  endforeach()
endif()
add_test(NAME test_embed_verbose COMMAND test_embed verbose)
set_tests_properties(test_embed_verbose PROPERTIES ENVIRONMENT "BNORM_VERBOSE=1"
  PASS_REGULAR_EXPRESSION "bnorm_verbose,exec,forward_training,4x3,channels_first,float32,schedule=[a-z-]+,isa=[a-z0-9]+,threads=1,comm=0,[0-9.]+ us")
