# mpi.cmake - synchronized batch norm with real MPI processes (only with -DBNORM_MPI=ON).
# test_mpi runs under mpirun with 1, 2, 3 and 4 ranks. The launch flags keep every byte on the loopback
# interface (TCP over lo, no UCX or shared-memory transports, no binding), allow more ranks than cores
# and running as root (containers, CI); BNORM_MPIEXEC_FLAGS overrides them for another MPI or a cluster.
if(BNORM_MPI)

  add_executable(test_mpi test_mpi.c)
  target_link_libraries(test_mpi PRIVATE bnorm_mpi bnorm_testlib MPI::MPI_C m)
  foreach(np 1 2 3 4)
    add_test(NAME test_mpi_np${np}
             COMMAND ${MPIEXEC_EXECUTABLE} ${BNORM_MPIEXEC_FLAGS} ${MPIEXEC_NUMPROC_FLAG} ${np}
                     ${MPIEXEC_PREFLAGS} $<TARGET_FILE:test_mpi> ${MPIEXEC_POSTFLAGS})
    # passive OpenMP waits: with more ranks than cores, spinning threads would starve the other ranks
    set_tests_properties(test_mpi_np${np} PROPERTIES TIMEOUT 120 PROCESSORS ${np}
                         ENVIRONMENT "OMP_WAIT_POLICY=PASSIVE")
  endforeach()

  # Faults of the one-collective mode (validate = 0): a C mismatch, a straggler after a timeout.
  add_executable(test_mpi_faults test_mpi_faults.c)
  target_link_libraries(test_mpi_faults PRIVATE bnorm_mpi bnorm_testlib MPI::MPI_C m)
  foreach(np 2 3)
    add_test(NAME test_mpi_faults_np${np}
             COMMAND ${MPIEXEC_EXECUTABLE} ${BNORM_MPIEXEC_FLAGS} ${MPIEXEC_NUMPROC_FLAG} ${np}
                     ${MPIEXEC_PREFLAGS} $<TARGET_FILE:test_mpi_faults> ${MPIEXEC_POSTFLAGS})
    set_tests_properties(test_mpi_faults_np${np} PROPERTIES TIMEOUT 120 PROCESSORS ${np}
                         ENVIRONMENT "OMP_WAIT_POLICY=PASSIVE")
  endforeach()
endif()
