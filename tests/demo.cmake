# demo.cmake - the training demo (examples/train_digits) learns, and its saved state reloads exactly.
# --check runs the short schedule (6 epochs on the shipped digits, one thread, the default seed and the
# high learning rate) quietly and fails unless
#   - the bnorm network's eval-mode test accuracy (running statistics) is >= 0.90 (seen: 96.4%; 92% to
#     98% over seeds 1-12). A batch norm that normalized wrongly, or whose running statistics were
#     wrong, stays near chance here: the same network without normalization reaches 7% to 24%;
#   - the network without normalization stays >= 30 points below it (the demo's claim);
#   - every BN layer counted one num_batches_tracked per training step;
#   - the state saved with bnorm_layer_save (safetensors) and the linear weights, loaded into a fresh
#     network, give bitwise identical eval logits and the same accuracy (skipped with a note when the
#     library is built without state I/O).
find_package(ZLIB QUIET)
if(BNORM_BUILD_EXAMPLES AND ZLIB_FOUND AND EXISTS ${PROJECT_SOURCE_DIR}/examples/train_digits.c)
  add_test(NAME demo_train_digits
           COMMAND train_digits --check --threads 1 --out ${CMAKE_CURRENT_BINARY_DIR}/demo_train_digits_state)
  set_tests_properties(demo_train_digits PROPERTIES TIMEOUT 120)
endif()

# demo_doc_current: the sample output and the accuracy tables in docs/demo.md are what the programs
# print now (scripts/demo_doc.py --check reruns them: about 45 short runs and one 2-rank MPI run, a
# minute; timings and the kernel name are not compared). Needs the MPI example, so only with
# -DBNORM_MPI=ON, and not in sanitizer builds (same numbers, ten times slower).
if(BNORM_BUILD_EXAMPLES AND BNORM_MPI AND NOT BNORM_SANITIZE AND ZLIB_FOUND)
  find_package(Python3 COMPONENTS Interpreter)
  if(Python3_FOUND)
    set(bnorm_python ${Python3_EXECUTABLE})
  else()
    set(bnorm_python /usr/bin/python3)
  endif()
  add_test(NAME demo_doc_current
           COMMAND ${bnorm_python} ${PROJECT_SOURCE_DIR}/scripts/demo_doc.py --check ${PROJECT_BINARY_DIR})
  set_tests_properties(demo_doc_current PROPERTIES TIMEOUT 600 PASS_REGULAR_EXPRESSION "demo_doc: OK")
endif()
