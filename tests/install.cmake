# The installed package works for every kind of consumer: CMake (C, C++-only, shared, static, the mpi
# component) and pkg-config (shared, --static, bnorm_mpi).
# (Not in sanitizer builds: an instrumented libbnorm cannot be loaded by an uninstrumented consumer.)
if(NOT BNORM_SANITIZE)
  # One consumer of each kind (tests/install/check_install.sh lists them); with MPI, run under the
  # launch flags of tests/mpi.cmake. It also builds and installs a second, MPI-less tree (a minute).
  set(bnorm_install_mpi "")
  if(BNORM_MPI)
    set(bnorm_install_mpi ${MPIEXEC_EXECUTABLE} ${BNORM_MPIEXEC_FLAGS})
  endif()
  add_test(NAME install_consumer
           COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/install/check_install.sh ${PROJECT_BINARY_DIR}
                   ${PROJECT_SOURCE_DIR} ${bnorm_install_mpi})
  set_tests_properties(install_consumer PROPERTIES TIMEOUT 600)
endif()
