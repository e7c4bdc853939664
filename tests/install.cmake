# The installed package works: find_package(bnorm) and pkg-config consumers build and run.
# (Not in sanitizer builds: an instrumented libbnorm cannot be loaded by an uninstrumented consumer.)
if(NOT BNORM_SANITIZE)
  add_test(NAME install_consumer
           COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/install/check_install.sh ${PROJECT_BINARY_DIR}
                   ${CMAKE_CURRENT_SOURCE_DIR}/install)
endif()
