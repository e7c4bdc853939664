# mpi.cmake - the MPI examples (only with -DBNORM_MPI=ON; included by examples/CMakeLists.txt).
# sync_train trains a small model data-parallel with synchronized batch norm and checks that its loss
# curve equals the single-process run on the full batch; ctest runs it on 2 ranks (float64) and on
# 3 ranks (float32) with the loopback-only launch flags of tests/mpi.cmake.
add_executable(sync_train sync_train.c)
target_link_libraries(sync_train PRIVATE bnorm_mpi MPI::MPI_C m)


foreach(run "2;" "3;--f32")
  list(GET run 0 np)
  list(GET run 1 opt)
  add_test(NAME example_sync_train_np${np}
           COMMAND ${MPIEXEC_EXECUTABLE} ${BNORM_MPIEXEC_FLAGS} ${MPIEXEC_NUMPROC_FLAG} ${np} ${MPIEXEC_PREFLAGS}
                   $<TARGET_FILE:sync_train> --quiet ${opt} ${MPIEXEC_POSTFLAGS})
  set_tests_properties(example_sync_train_np${np} PROPERTIES TIMEOUT 60 PROCESSORS ${np}
                       ENVIRONMENT "OMP_WAIT_POLICY=PASSIVE" PASS_REGULAR_EXPRESSION ": OK")
endforeach()

# train_digits_mpi: the digits demo data-parallel with synchronized BN (docs/demo.md). It compiles the
# demo's sources itself so that it links one bnorm, the shared one under bnorm_mpi. ctest runs the
# 6-epoch schedule (lr 0.5, batch 64) on 2 ranks with balanced slices (32/32; the last batch of 29
# rows 15/14) and on 3 ranks with --fill (22/22/20; the last batch 22/7/0, so rank 2's slice is empty
# once an epoch). Each run fails unless every step agrees with one process running it on the whole
# batch from the same state (loss, summed gradients, running statistics within 3e-5 relative), the
# first 20 steps agree with an independent single-process run (1e-4), the ranks end with bitwise
# identical networks, and the eval-mode test accuracy is >= 0.9.
find_package(ZLIB QUIET)
if(ZLIB_FOUND)
  add_executable(train_digits_mpi train_digits_mpi.c demo_data.c demo_net.c $<TARGET_OBJECTS:bnorm_demo_data>)
  target_include_directories(train_digits_mpi PRIVATE ${CMAKE_CURRENT_SOURCE_DIR})
  target_link_libraries(train_digits_mpi PRIVATE bnorm_mpi MPI::MPI_C ZLIB::ZLIB m)
  if(BNORM_OPENMP)
    target_link_libraries(train_digits_mpi PRIVATE OpenMP::OpenMP_C)
  endif()
  foreach(run "2;" "3;--fill")
    list(GET run 0 np)
    list(GET run 1 opt)
    add_test(NAME example_train_digits_mpi_np${np}
             COMMAND ${MPIEXEC_EXECUTABLE} ${BNORM_MPIEXEC_FLAGS} ${MPIEXEC_NUMPROC_FLAG} ${np} ${MPIEXEC_PREFLAGS}
                     $<TARGET_FILE:train_digits_mpi> --check ${opt} ${MPIEXEC_POSTFLAGS})
    set_tests_properties(example_train_digits_mpi_np${np} PROPERTIES TIMEOUT 120 PROCESSORS ${np}
                         ENVIRONMENT "OMP_WAIT_POLICY=PASSIVE")
  endforeach()
else()
  message(STATUS "examples: zlib not found (Debian: apt-get install zlib1g-dev): train_digits_mpi is not built")
endif()
