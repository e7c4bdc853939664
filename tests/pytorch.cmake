# pytorch.cmake - agreement with PyTorch. test_pytorch replays the committed fixtures in
# tests/fixtures/ (written by tests/fixtures/gen_fixtures.py with Debian's python3-torch) through the
# layer API; it needs no Python and fails if the fixtures are missing.
bnorm_add_test(test_pytorch test_pytorch.c)
target_compile_definitions(test_pytorch PRIVATE BNORM_FIXTURE_DIR="${CMAKE_CURRENT_SOURCE_DIR}/fixtures")

# test_pytorch_fixtures_current: the committed fixtures are what the generator writes (regenerated in a
# temporary directory and compared). Always registered: whether /usr/bin/python3 can import torch is
# checked when the test runs (scripts/need_torch.sh), and the test fails saying what to install if not.
add_test(NAME test_pytorch_fixtures_current
         COMMAND bash ${PROJECT_SOURCE_DIR}/scripts/need_torch.sh /usr/bin/python3
                 ${CMAKE_CURRENT_SOURCE_DIR}/fixtures/gen_fixtures.py --check ${CMAKE_CURRENT_SOURCE_DIR}/fixtures)
