#!/usr/bin/env bash
# What the AArch64 slice of .ci/run needs on a Debian 12 machine: the cross compiler and qemu-user
# from Debian's packages, and Debian's arm64 Python 3.11 with numpy, regex and its headers unpacked into
# the folder $1, beside the host's own packages (nothing arm64 is installed: python3:arm64 would
# replace the host's python3). The cross build compiles against those headers
# (cmake/aarch64-linux-gnu.cmake) and "qemu-aarch64 -L $1 $1/usr/bin/python3.11" runs the engine's
# tests (tests/test_engine_aarch64.py).
set -euo pipefail
root=$(realpath -m "$1")
sudo=$([ "$(id -u)" = 0 ] || echo sudo)
$sudo dpkg --add-architecture arm64
$sudo apt-get update -qq
$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq crossbuild-essential-arm64 qemu-user >/dev/null
# What the interpreter, numpy and the headers need, as apt resolves it, less what only installing
# would use (dpkg, tar, perl) and all but one BLAS (numpy's alternatives).
wanted=(python3.11-minimal:arm64 libpython3.11-stdlib:arm64 libpython3.11-dev:arm64 python3-numpy:arm64 python3-regex:arm64 libstdc++6:arm64)
mapfile -t pkgs < <(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks --no-replaces \
                      --no-enhances --no-pre-depends "${wanted[@]}" | grep -E '^[a-z0-9].*:arm64$' |
                    grep -Ev '^(dpkg|install-info|tar|perl|libperl[0-9.]*|libc-dev-bin|rpcsvc-proto|python3|python3.11|libatlas3-base|libblis4-.*|libopenblas0-.*):' |
                    sort -u)
debs=$(mktemp -d)
(cd "$debs" && chmod 777 . && apt-get download -qq "${pkgs[@]}")
mkdir -p "$root"
for deb in "$debs"/*.deb; do dpkg -x "$deb" "$root"; done
rm -rf "$debs"
# numpy loads libblas.so.3 and liblapack.so.3, which dpkg's alternatives would have linked.
ln -sf blas/libblas.so.3 "$root/usr/lib/aarch64-linux-gnu/libblas.so.3"
ln -sf lapack/liblapack.so.3 "$root/usr/lib/aarch64-linux-gnu/liblapack.so.3"
# Byte-compiled once here, as dpkg's postinst would have: where PYTHONDONTWRITEBYTECODE is set (or the
# tree is read-only), every arm64 process under qemu compiled the stdlib and numpy again (~5 s each,
# ~2 minutes of .ci/run). A .pyc depends on the Python version, not the CPU: the host's python3 writes
# them natively when it is a 3.11, the arm64 one under qemu otherwise.
if python3 -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then compile=(python3); else compile=(qemu-aarch64 -L "$root" "$root/usr/bin/python3.11"); fi
"${compile[@]}" -m compileall -q -j 1 "$root/usr/lib/python3.11" "$root/usr/lib/python3/dist-packages" >/dev/null
qemu-aarch64 -L "$root" "$root/usr/bin/python3.11" -c "import numpy, platform; print('arm64 Python', platform.python_version(), platform.machine(), 'numpy', numpy.__version__)"
