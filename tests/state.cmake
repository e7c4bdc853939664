# state.cmake - safetensors state files and inference folding (issue 6): round trips, bad files,
# interrupted saves, folding; the C side of the PyTorch interop on committed fixtures; the same
# against a live torch when /usr/bin/python3 has it; a bounded libFuzzer run of the loader when clang
# with libFuzzer is available. All of it needs the state I/O (BNORM_STATE_IO=ON).
if(NOT BNORM_STATE_IO)
  return()
endif()

bnorm_add_test(test_state test_state.c)
target_compile_definitions(test_state PRIVATE BNORM_STATE_DATA_DIR="${CMAKE_CURRENT_SOURCE_DIR}/interop/data")

add_executable(test_state_interop interop/test_state_interop.c)
target_link_libraries(test_state_interop PRIVATE bnorm_static bnorm_testlib)
set(BNORM_INTEROP_OUT ${CMAKE_CURRENT_BINARY_DIR}/interop_fixture)
file(MAKE_DIRECTORY ${BNORM_INTEROP_OUT})
add_test(NAME test_state_interop
         COMMAND test_state_interop ${CMAKE_CURRENT_SOURCE_DIR}/interop/data ${BNORM_INTEROP_OUT})

# Live PyTorch, both ways. Always registered; scripts/need_torch.sh fails it, saying what to install,
# when /usr/bin/python3 cannot import torch at test time.
set(BNORM_INTEROP_TORCH_OUT ${CMAKE_CURRENT_BINARY_DIR}/interop_torch)
file(MAKE_DIRECTORY ${BNORM_INTEROP_TORCH_OUT})
add_test(NAME test_state_interop_torch
         COMMAND bash ${PROJECT_SOURCE_DIR}/scripts/need_torch.sh /usr/bin/python3
                 ${CMAKE_CURRENT_SOURCE_DIR}/interop/torch_interop.py run
                 $<TARGET_FILE:test_state_interop> ${BNORM_INTEROP_TORCH_OUT})

# libFuzzer: the loader and the listing built with clang -fsanitize=fuzzer,address (the library's
# sources compiled again, scalar kernels only), run for a bounded time on a copy of the committed seeds.
set(BNORM_FUZZ_SECONDS 10 CACHE STRING "Seconds the safetensors fuzz test runs")
find_program(BNORM_CLANG NAMES clang clang-14)
if(BNORM_CLANG)
  set(probe ${CMAKE_CURRENT_BINARY_DIR}/fuzz_probe)
  file(WRITE ${probe}.c "#include <stddef.h>\n#include <stdint.h>\nint LLVMFuzzerTestOneInput(const uint8_t *d, size_t n) { (void)d; (void)n; return 0; }\n")
  execute_process(COMMAND ${BNORM_CLANG} -fsanitize=fuzzer,address ${probe}.c -o ${probe}
                  RESULT_VARIABLE BNORM_FUZZ_RC OUTPUT_QUIET ERROR_QUIET)
  if(BNORM_FUZZ_RC EQUAL 0)
    set(src ${PROJECT_SOURCE_DIR}/src)
    set(fuzz_sources ${CMAKE_CURRENT_SOURCE_DIR}/fuzz/fuzz_safetensors.c ${src}/io/safetensors.c
        ${src}/layer/layer.c ${src}/layer/fold.c ${src}/core/error.c ${src}/core/desc.c ${src}/core/half.c
        ${src}/core/plan.c ${src}/core/comm.c
        ${src}/cpu/dispatch.c ${src}/cpu/driver.c ${src}/cpu/tuning.c ${src}/cpu/kernels.c)
    set(fuzz_exe ${CMAKE_CURRENT_BINARY_DIR}/fuzz_safetensors)
    add_custom_command(OUTPUT ${fuzz_exe}
      COMMAND ${BNORM_CLANG} -std=c11 -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined
              -DBN_ISA=scalar -I${PROJECT_SOURCE_DIR}/include -I${BNORM_GENERATED_INCLUDE} -I${src}
              ${fuzz_sources} -lm -o ${fuzz_exe}
      DEPENDS ${fuzz_sources} ${src}/core/internal.h ${src}/core/plan.h ${src}/layer/layer_internal.h
              ${PROJECT_SOURCE_DIR}/include/bnorm/bnorm.h
      COMMENT "Building the safetensors fuzz target with clang/libFuzzer" VERBATIM)
    add_custom_target(fuzz_safetensors_build ALL DEPENDS ${fuzz_exe})
    set(work ${CMAKE_CURRENT_BINARY_DIR}/fuzz_corpus)
    file(MAKE_DIRECTORY ${work})
    # New inputs go to the first directory (in the build tree); the committed seeds are read only.
    add_test(NAME test_state_fuzz
             COMMAND ${CMAKE_COMMAND} -DFUZZ_EXE=${fuzz_exe} -DSECONDS=${BNORM_FUZZ_SECONDS} -DWORK=${work}
                     -DSEEDS=${CMAKE_CURRENT_SOURCE_DIR}/fuzz/corpus -P ${CMAKE_CURRENT_SOURCE_DIR}/fuzz/run_fuzz.cmake)
    set_tests_properties(test_state_fuzz PROPERTIES LABELS fuzz TIMEOUT 300)
  else()
    message(STATUS "bnorm: clang cannot build libFuzzer targets: test_state_fuzz skipped")
  endif()
else()
  message(STATUS "bnorm: no clang: test_state_fuzz skipped")
endif()
