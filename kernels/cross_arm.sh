#!/usr/bin/env bash
# Cross-compile the kernel library and its C test driver (kernels/tests_c/ctest.c) for aarch64
# with Debian's gcc-aarch64-linux-gnu and run it under qemu-user, so the NEON variant is checked
# bit for bit against the scalar reference (and 1 vs 4 threads).
#
#   kernels/cross_arm.sh            # aarch64 cross build + qemu-aarch64 run
#   kernels/cross_arm.sh --native   # the same driver built for this machine (AVX2/AVX-512 here)
#
# Needs: apt-get install -y gcc-aarch64-linux-gnu qemu-user
set -euo pipefail
cd "$(dirname "$0")/.."

CFLAGS="-O2 -std=c11 -ffp-contract=off -fno-math-errno -pthread -Wall -Wno-unused-function"
INC="-Ikernels/include -Ikernels/src"
SRCS="kernels/src/*.c kernels/tests_c/ctest.c"
OUT=build/ctest
mkdir -p "$OUT"

if [[ "${1:-}" == "--native" ]]; then
    CC=${CC:-cc}
    # shellcheck disable=SC2086
    $CC $CFLAGS $INC $SRCS -o "$OUT/ctest-native" -lm
    exec "$OUT/ctest-native"
fi

CC=${CC:-aarch64-linux-gnu-gcc}
QEMU=${QEMU:-qemu-aarch64}
for tool in "$CC" "$QEMU"; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "cross_arm.sh: $tool not found (apt-get install -y gcc-aarch64-linux-gnu qemu-user)" >&2
        exit 2
    fi
done
# shellcheck disable=SC2086
$CC $CFLAGS $INC $SRCS -o "$OUT/ctest-aarch64" -static -lm
file "$OUT/ctest-aarch64" 2>/dev/null || true
exec "$QEMU" "$OUT/ctest-aarch64"
