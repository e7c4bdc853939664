# core.cmake - the core issue's remaining tests: hard data, gradient checks, the layer object, every
# error path, the float16/bfloat16 conversion kernels, and a C99 compile of the public header.
bnorm_add_test(test_hard test_hard.c)
bnorm_add_test(test_gradcheck test_gradcheck.c)
bnorm_add_test(test_layer test_layer.c)
bnorm_add_test(test_errors test_errors.c)
bnorm_add_test(test_convert test_convert.c)

# The public header must be strict C99: this program includes only bnorm/bnorm.h, is compiled with
# -std=c99 -pedantic and every warning an error, and links the shared library (exported symbols).
add_executable(test_c99 test_c99.c)
target_link_libraries(test_c99 PRIVATE bnorm)
target_compile_definitions(test_c99 PRIVATE BNORM_CMAKE_PROJECT_VERSION="${PROJECT_VERSION}")
set_target_properties(test_c99 PROPERTIES C_STANDARD 99 C_STANDARD_REQUIRED ON C_EXTENSIONS OFF)
if(CMAKE_C_COMPILER_ID MATCHES "GNU|Clang")
  target_compile_options(test_c99 PRIVATE -std=c99 -pedantic -Werror -Wall -Wextra)
endif()
add_test(NAME test_c99 COMMAND test_c99)
