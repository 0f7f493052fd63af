#!/usr/bin/env bash
# `featherweight worker --queue cpu-arm` on aarch64 under qemu-user, in the environment that
# deploy/arm/build_env.sh caches in $FEATHERWEIGHT_ARM_ENV (default ~/.cache/featherweight-arm).
# Settings come from the environment as for any worker (FEATHERWEIGHT_DATABASE_URL, _BROKER_URL,
# _STORAGE / _S3_*: the same Postgres, Redis and S3 as the x86 API). Extra arguments go to the
# worker command (e.g. another --queue).
#
#   make arm-worker      # builds the environment when needed, then runs this
#
# The interpreter, numpy, ONNX Runtime and our kernels are the aarch64 builds; every figure they
# produce is computed on aarch64. The timings are qemu's: FEATHERWEIGHT_EMULATED=1 makes the report
# say so (measured_on.emulated, target_match false, a notice), never a cpu-arm performance figure.
set -euo pipefail
cd "$(dirname "$0")/../.."
ENV_DIR=${FEATHERWEIGHT_ARM_ENV:-$HOME/.cache/featherweight-arm}
SYSROOT=$ENV_DIR/sysroot
for part in "$SYSROOT/usr/bin/python3.11" "$SYSROOT/proc/cpuinfo" "$ENV_DIR/cpu" "$ENV_DIR/site" kernels/_ffi.cpython-311-aarch64-linux-gnu.so; do
  [ -e "$part" ] || { echo "arm worker: $part is missing; run deploy/arm/build_env.sh (make arm-env)" >&2; exit 2; }
done
export FEATHERWEIGHT_EMULATED=1
export FW_KERNELS_NO_AUTOBUILD=1          # the kernels are cross-built; there is no compiler in the sysroot
export PYTHONPATH="$PWD:$ENV_DIR/site"
export PYTHONUNBUFFERED=1
# -s: no user site-packages of the host's user; the sysroot's own prefix is the interpreter's
exec qemu-aarch64 -cpu "$(cat "$ENV_DIR/cpu")" -L "$SYSROOT" "$SYSROOT/usr/bin/python3.11" -s -m featherweight.cli worker --queue cpu-arm "$@"
