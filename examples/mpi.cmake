# mpi.cmake - the MPI example (only with -DBNORM_MPI=ON; included by examples/CMakeLists.txt).
# sync_train trains a small model data-parallel with synchronized batch norm and checks that its loss
# curve equals the single-process run on the full batch; ctest runs it on 2 ranks (float64) and on
# 3 ranks (float32) with the loopback-only launch flags of tests/mpi.cmake.
add_executable(sync_train sync_train.c)
target_link_libraries(sync_train PRIVATE bnorm_mpi MPI::MPI_C m)

if(NOT DEFINED BNORM_MPIEXEC_FLAGS)
  set(_bnorm_mpi_flags "")
  execute_process(COMMAND ${MPIEXEC_EXECUTABLE} --version OUTPUT_VARIABLE _bnorm_mpi_version ERROR_QUIET)
  if(_bnorm_mpi_version MATCHES "Open MPI|OpenRTE")
    set(_bnorm_mpi_flags --oversubscribe --allow-run-as-root --bind-to none --mca pml ob1
                         --mca btl self,tcp --mca btl_tcp_if_include lo --mca oob_tcp_if_include lo)
  endif()
  set(BNORM_MPIEXEC_FLAGS "${_bnorm_mpi_flags}" CACHE STRING
      "Flags for mpiexec in the MPI tests and examples (default: loopback-only OpenMPI flags)")
endif()

foreach(run "2;" "3;--f32")
  list(GET run 0 np)
  list(GET run 1 opt)
  add_test(NAME example_sync_train_np${np}
           COMMAND ${MPIEXEC_EXECUTABLE} ${BNORM_MPIEXEC_FLAGS} ${MPIEXEC_NUMPROC_FLAG} ${np} ${MPIEXEC_PREFLAGS}
                   $<TARGET_FILE:sync_train> --quiet ${opt} ${MPIEXEC_POSTFLAGS})
  set_tests_properties(example_sync_train_np${np} PROPERTIES TIMEOUT 60 PROCESSORS ${np}
                       ENVIRONMENT "OMP_WAIT_POLICY=PASSIVE" PASS_REGULAR_EXPRESSION ": OK")
endforeach()
