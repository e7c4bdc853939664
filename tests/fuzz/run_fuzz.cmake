# run_fuzz.cmake - runs the libFuzzer target quietly for ctest: prints libFuzzer's report only when it
# finds something, else one summary line. Variables: FUZZ_EXE, SECONDS, WORK (new inputs), SEEDS.
execute_process(COMMAND ${FUZZ_EXE} -max_total_time=${SECONDS} -timeout=10 -rss_limit_mb=1024
                        -artifact_prefix=${WORK}/ ${WORK} ${SEEDS}
                RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(NOT rc EQUAL 0)
  message("${out}${err}")
  message(FATAL_ERROR "test_state_fuzz: 0 passed, 1 failed (libFuzzer exit status ${rc}; the input is in ${WORK})")
endif()
string(REGEX MATCH "Done [0-9]+ runs" runs "${err}")
message("test_state_fuzz: 1 passed, 0 failed (${runs} in ${SECONDS} s)")
