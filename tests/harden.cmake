# harden.cmake - issue 18: hostile state files in bounded time and memory (ratios against a linear
# baseline measured in the same run), limits of the header, FIFOs, the saturating batch counter,
# saves killed with SIGKILL, and API edges. Needs the state I/O (BNORM_STATE_IO=ON).
if(BNORM_STATE_IO)
  bnorm_add_test(test_harden test_harden.c)
  set_tests_properties(test_harden PROPERTIES TIMEOUT 300)
endif()
