# repo.cmake - what a newcomer meets first: the README's example and commands run as written, the
# license, changelog and single version source, the CUDA option's message, PyTorch tests that no cache
# can drop, a demo that runs from anywhere (tests/repo/check_repo.sh lists the checks). Not in
# sanitizer builds: the README's programs link the installed, uninstrumented way.
if(NOT BNORM_SANITIZE)
  add_test(NAME repo_checks COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/repo/check_repo.sh ${PROJECT_SOURCE_DIR} ${PROJECT_BINARY_DIR})
  set_tests_properties(repo_checks PROPERTIES TIMEOUT 300 PASS_REGULAR_EXPRESSION "repo: [0-9]+ passed, 0 failed")
endif()
