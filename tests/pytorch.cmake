# pytorch.cmake - agreement with PyTorch. test_pytorch replays the committed fixtures in
# tests/fixtures/ (written by tests/fixtures/gen_fixtures.py with Debian's python3-torch) through the
# layer API; it needs no Python and fails if the fixtures are missing.
bnorm_add_test(test_pytorch test_pytorch.c)
target_compile_definitions(test_pytorch PRIVATE BNORM_FIXTURE_DIR="${CMAKE_CURRENT_SOURCE_DIR}/fixtures")

# test_pytorch_fixtures_current: the committed fixtures are what the generator writes (regenerated in a
# temporary directory and compared). Registered only where /usr/bin/python3 can import torch.
if(NOT DEFINED BNORM_HAVE_PYTHON_TORCH)
  set(BNORM_HAVE_PYTHON_TORCH OFF)
  if(EXISTS /usr/bin/python3)
    execute_process(COMMAND /usr/bin/python3 -c "import torch"
                    RESULT_VARIABLE bnorm_torch_rc OUTPUT_QUIET ERROR_QUIET TIMEOUT 60)
    if(bnorm_torch_rc EQUAL 0)
      set(BNORM_HAVE_PYTHON_TORCH ON)
    endif()
  endif()
  set(BNORM_HAVE_PYTHON_TORCH ${BNORM_HAVE_PYTHON_TORCH} CACHE BOOL
      "/usr/bin/python3 can import torch (regenerate-and-compare test of the PyTorch fixtures)")
endif()
if(BNORM_HAVE_PYTHON_TORCH)
  add_test(NAME test_pytorch_fixtures_current
           COMMAND /usr/bin/python3 ${CMAKE_CURRENT_SOURCE_DIR}/fixtures/gen_fixtures.py
                   --check ${CMAKE_CURRENT_SOURCE_DIR}/fixtures)
endif()
