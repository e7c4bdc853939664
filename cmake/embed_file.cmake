# embed_file.cmake - writes a C source holding a file's bytes:
#   cmake -DINPUT=file -DOUTPUT=out.c -DSYMBOL=name -P embed_file.cmake
# defines  const unsigned char name[]  and  const size_t name_size.
file(READ "${INPUT}" hex HEX)
string(LENGTH "${hex}" n)
math(EXPR size "${n} / 2")
string(REGEX REPLACE "([0-9a-f][0-9a-f])" "0x\\1," bytes "${hex}")
# 16 bytes a line
string(REGEX REPLACE "((0x[0-9a-f][0-9a-f],){16})" "\\1\n" bytes "${bytes}")
get_filename_component(name "${INPUT}" NAME)
file(WRITE "${OUTPUT}.tmp" "/* Generated from ${name} by cmake/embed_file.cmake; do not edit. */\n#include <stddef.h>\n"
     "const unsigned char ${SYMBOL}[] = {\n${bytes}\n};\nconst size_t ${SYMBOL}_size = ${size};\n")
file(RENAME "${OUTPUT}.tmp" "${OUTPUT}")
