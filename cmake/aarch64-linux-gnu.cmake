# Cross-compiling the engine for AArch64 Linux with Debian's crossbuild-essential-arm64 (docs/engine.md,
# "ARM"): cmake -DCMAKE_TOOLCHAIN_FILE=cmake/aarch64-linux-gnu.cmake -DGPT2S_AARCH64_ROOT=<root> ...
# <root> is a folder holding Debian's arm64 Python (libpython3.11-dev:arm64 and what it needs,
# unpacked by .ci/aarch64_root.sh): its headers build the module, and qemu-aarch64 runs it from there.
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
# Libraries and headers from the cross toolchain only; programs (python, ninja) from the host.
set(CMAKE_FIND_ROOT_PATH /usr/aarch64-linux-gnu)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE BOTH)  # pybind11's CMake files come from the host's pip

set(GPT2S_AARCH64_ROOT "$ENV{GPT2S_AARCH64_ROOT}" CACHE PATH "Unpacked Debian arm64 root holding usr/include/python3.11")
if(NOT EXISTS "${GPT2S_AARCH64_ROOT}/usr/include/python3.11/Python.h")
  message(FATAL_ERROR "GPT2S_AARCH64_ROOT=${GPT2S_AARCH64_ROOT} has no usr/include/python3.11/Python.h: run .ci/aarch64_root.sh <root> first")
endif()
set(Python_INCLUDE_DIR "${GPT2S_AARCH64_ROOT}/usr/include/python3.11" CACHE PATH "")
# Debian's pyconfig.h includes <aarch64-linux-gnu/python3.11/pyconfig.h>; searched after the cross
# toolchain's own headers, so the root's copy of glibc's headers is never used.
set(CMAKE_CXX_FLAGS_INIT "-idirafter ${GPT2S_AARCH64_ROOT}/usr/include")
# pybind11 asks the interpreter for the module suffix only when not cross-compiling.
set(PYTHON_MODULE_EXTENSION ".cpython-311-aarch64-linux-gnu.so" CACHE INTERNAL "")
set(PYTHON_MODULE_DEBUG_POSTFIX "" CACHE INTERNAL "")
set(PYTHON_IS_DEBUG 0 CACHE INTERNAL "")
set(CMAKE_CROSSCOMPILING_EMULATOR qemu-aarch64 -L ${GPT2S_AARCH64_ROOT})
