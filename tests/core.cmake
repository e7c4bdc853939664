# core.cmake - the core issue's remaining tests: hard data, gradient checks, the layer object, every
# error path, the float16/bfloat16 conversion kernels, and a C99 compile of the public header.
bnorm_add_test(test_hard test_hard.c)
bnorm_add_test(test_gradcheck test_gradcheck.c)
bnorm_add_test(test_layer test_layer.c)
bnorm_add_test(test_errors test_errors.c)
bnorm_add_test(test_convert test_convert.c)
bnorm_add_test(test_kernels test_kernels.c)

# The public header must be strict C99: this program includes only bnorm/bnorm.h, is compiled with
# -std=c99 -pedantic and every warning an error, and links the shared library (exported symbols).
add_executable(test_c99 test_c99.c)
target_link_libraries(test_c99 PRIVATE bnorm)
target_compile_definitions(test_c99 PRIVATE BNORM_CMAKE_PROJECT_VERSION="${PROJECT_VERSION}")
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

# ABI (issue 16): the library's sources again, with a field appended to the argument structs
# (-DBNORM_ABI_TEST_APPEND); a consumer compiled against the header without it must keep working.
set(bnorm_abi_sources "")
foreach(s ${BNORM_SOURCES})
  list(APPEND bnorm_abi_sources ${PROJECT_SOURCE_DIR}/${s})
endforeach()
add_library(bnorm_abi_appended SHARED ${bnorm_abi_sources} ${BNORM_CPU_KERNEL_OBJECTS})
target_include_directories(bnorm_abi_appended PRIVATE ${PROJECT_SOURCE_DIR}/include ${BNORM_GENERATED_INCLUDE})
target_compile_definitions(bnorm_abi_appended PRIVATE ${BNORM_ISA_DEFS} BNORM_BUILDING BNORM_ABI_TEST_APPEND)
target_link_libraries(bnorm_abi_appended PRIVATE m)
if(BNORM_OPENMP)
  target_link_libraries(bnorm_abi_appended PRIVATE OpenMP::OpenMP_C)
endif()
add_executable(test_abi_consumer abi/abi_consumer.c harness.c ref.c)
target_include_directories(test_abi_consumer PRIVATE ${PROJECT_SOURCE_DIR}/include ${BNORM_GENERATED_INCLUDE} ${CMAKE_CURRENT_SOURCE_DIR})
target_link_libraries(test_abi_consumer PRIVATE bnorm_abi_appended m)
add_test(NAME test_abi_appended_field COMMAND test_abi_consumer)

# Only bnorm_ symbols are exported by the shared library.
find_program(BNORM_NM NAMES nm)
if(BNORM_NM)
  add_test(NAME test_exports COMMAND ${CMAKE_COMMAND} -DNM=${BNORM_NM} -DLIB=$<TARGET_FILE:bnorm>
                                     -P ${CMAKE_CURRENT_SOURCE_DIR}/abi/check_exports.cmake)
endif()

# Both walks of the row kernels on every machine (issue 19): which one a CPU takes is chosen from its
# vendor (src/cpu/tuning.c), so each test of the row kernels also runs with each walk forced.
foreach(walk row block)
  foreach(t test_functional test_hard test_embed)
    add_test(NAME ${t}_walk_${walk} COMMAND ${t})
    set_tests_properties(${t}_walk_${walk} PROPERTIES ENVIRONMENT "BNORM_ROWS_WALK=${walk}")
  endforeach()
endforeach()
add_test(NAME test_embed_verbose_tuning COMMAND test_embed verbose)
set_tests_properties(test_embed_verbose_tuning PROPERTIES ENVIRONMENT "BNORM_VERBOSE=1;BNORM_ROWS_WALK=block"
  PASS_REGULAR_EXPRESSION "walk=blocks,tuning=(intel|amd|other),l1d=[0-9]+K,l2=[0-9]+K,l3=[0-9a-z]+M?\\((cpuid|sysconf|defaults)\\),chanblock=[0-9]+K,rowgroup=[0-9]+K,rowwalk<=0,rowstream>=([0-9]+K|never),bwdstream>=([0-9]+K|never),inferstream=(planes|no),apply=(back|front)")
# ... and with every output streamed from the first byte (so the streaming paths run on small tensors
# too, whatever the CPU chose), and with none streamed.
foreach(t test_functional test_hard test_fused)
  add_test(NAME ${t}_stream_always COMMAND ${t})
  set_tests_properties(${t}_stream_always PROPERTIES ENVIRONMENT "BNORM_ROWS_STREAM=always;BNORM_PLANES_STREAM=always")
  add_test(NAME ${t}_stream_never COMMAND ${t})
  set_tests_properties(${t}_stream_never PROPERTIES ENVIRONMENT "BNORM_ROWS_STREAM=never;BNORM_PLANES_STREAM=never")
endforeach()
