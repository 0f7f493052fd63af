#!/usr/bin/env bash
# Builds (or refreshes) the aarch64 environment that deploy/arm/worker.sh runs a cpu-arm worker in,
# on an x86_64 Debian machine, under qemu-user. Nothing heavy lands in the repository: everything is
# cached in $FEATHERWEIGHT_ARM_ENV (default ~/.cache/featherweight-arm), each part rebuilt only when
# its inputs change, so a warm run takes seconds.
#
#   deploy/arm/build_env.sh          # what `make arm-env` and .ci/run call
#
# Parts (no debootstrap: an arm64 Debian root took 25 minutes and stalled under qemu):
#   sysroot/  Debian bookworm's arm64 python3.11 and the libraries it and the wheels need (libc,
#             libstdc++), fetched by a private apt instance (its own lists, status and cache under
#             apt/, the host's apt configuration untouched) and unpacked with dpkg-deb -x;
#   site/     this project's dependencies as aarch64 wheels (pip --platform manylinux_2_*_aarch64),
#             pinned to the versions in the host's venv so both workers run the same releases;
#   cpu       the qemu CPU model the worker emulates: neoverse-n1 (FEATHERWEIGHT_ARM_CPU; see below);
#   sysroot/proc/cpuinfo  an aarch64 /proc/cpuinfo listing the emulated CPU's own HWCAP features:
#             qemu-user 7.2 (Debian 12) shows the guest the x86 host's file, and ONNX Runtime's cpuinfo
#             library crashes the interpreter (SIGSEGV at import) when it finds no ARM processor there.
#             qemu -L serves a path from the sysroot when the sysroot has it (qemu >= 8.1 writes one
#             itself);
#   kernels/_ffi.cpython-311-aarch64-linux-gnu.so  our C kernels, cross-compiled with
#             gcc-aarch64-linux-gnu from the C that the host's cffi emits (cffi pinned to the host's
#             version on both sides). The aarch64 interpreter loads this name before _ffi.abi3.so; the
#             x86 interpreter never looks at it.
#
# Needs: apt-get install -y qemu-user gcc-aarch64-linux-gnu (as .ci/run does), dpkg-deb, network
# access to the Debian mirror and the Python package index, and $PYTHON (default .venv/bin/python)
# with pip and cffi: the venv `make install` builds.
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
ENV_DIR=${FEATHERWEIGHT_ARM_ENV:-$HOME/.cache/featherweight-arm}
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
SUITE=bookworm
# python3.11 and what the wheels link against; the headers (libpython3.11-dev) are for the kernels
DEBS="python3.11-minimal libpython3.11-stdlib libpython3.11-dev libstdc++6 libgcc-s1"
KERNELS_SO=kernels/_ffi.cpython-311-aarch64-linux-gnu.so
started=$(date +%s)

say() { echo "arm env: $*" >&2; }
for tool in qemu-aarch64 aarch64-linux-gnu-gcc dpkg-deb apt-get; do
  command -v "$tool" >/dev/null || { say "$tool not found (apt-get install -y qemu-user gcc-aarch64-linux-gnu)"; exit 2; }
done
[ -x "$PYTHON" ] || { say "$PYTHON not found (make install first, or set PYTHON)"; exit 2; }
mkdir -p "$ENV_DIR"
stamp_ok() { [ -f "$ENV_DIR/$1.stamp" ] && [ "$(cat "$ENV_DIR/$1.stamp")" = "$2" ]; }
digest() { sha256sum | cut -c1-16; }

# --- sysroot: Debian's arm64 python3.11 ------------------------------------------------------------
SYSROOT_LAYOUT=1     # raise when the way the sysroot is assembled changes
sysroot_key=$(printf "%s %s %s" "$SUITE" "$DEBS" "$SYSROOT_LAYOUT" | digest)
if ! stamp_ok sysroot "$sysroot_key"; then
  say "fetching Debian $SUITE arm64 packages: $DEBS"
  apt_dir=$ENV_DIR/apt
  rm -rf "$apt_dir" "$ENV_DIR/sysroot"
  mkdir -p "$apt_dir"/{state/lists/partial,cache/archives/partial,etc/sources.list.d,etc/preferences.d}
  : > "$apt_dir/status"
  for suite in "$SUITE main" "$SUITE-updates main" "$SUITE-security main"; do
    set -- $suite
    uri=http://deb.debian.org/debian; [ "${1%-security}" != "$1" ] && uri=http://deb.debian.org/debian-security
    printf 'Types: deb\nURIs: %s\nSuites: %s\nComponents: %s\nArchitectures: arm64\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n' \
      "$uri" "$1" "$2" >> "$apt_dir/etc/sources.list.d/debian.sources"
  done
  # a private apt instance: its own lists, status and cache; an empty status file means every
  # dependency is fetched (libc6 included), which is what an empty root needs
  apt_private=(apt-get -q -o "Dir::Etc=$apt_dir/etc" -o Dir::Etc::SourceList=/dev/null
    -o "Dir::Etc::SourceParts=$apt_dir/etc/sources.list.d" -o "Dir::Etc::PreferencesParts=$apt_dir/etc/preferences.d"
    -o "Dir::State=$apt_dir/state" -o "Dir::State::status=$apt_dir/status" -o "Dir::Cache=$apt_dir/cache"
    -o APT::Architecture=arm64 -o APT::Architectures::=arm64 -o Debug::NoLocking=1 -o APT::Sandbox::User=root)
  nice -n 19 "${apt_private[@]}" update >/dev/null
  # shellcheck disable=SC2086
  nice -n 19 "${apt_private[@]}" install --download-only -y --no-install-recommends $DEBS >/dev/null
  mkdir -p "$ENV_DIR/sysroot"
  for deb in "$apt_dir"/cache/archives/*.deb; do dpkg-deb -x "$deb" "$ENV_DIR/sysroot"; done
  rm -rf "$apt_dir/cache/archives" "$apt_dir/state/lists"     # the unpacked root is what is kept
  echo "$sysroot_key" > "$ENV_DIR/sysroot.stamp"
fi
SYSROOT=$ENV_DIR/sysroot
PY_ARM=$SYSROOT/usr/bin/python3.11
ARM_CPU=${FEATHERWEIGHT_ARM_CPU:-neoverse-n1}     # the qemu CPU model the worker runs on (below)
run_arm() { qemu-aarch64 -cpu "$ARM_CPU" -L "$SYSROOT" "$PY_ARM" -s "$@"; }

# --- site: the dependencies as aarch64 wheels, at the host venv's versions -------------------------
requirements=$("$PYTHON" - <<'EOF'
import re, tomllib
from importlib.metadata import version
for dep in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]:
    name = re.match(r"[A-Za-z0-9_.-]+(\[[^\]]*\])?", dep).group(0)
    print(f"{name}=={version(name.split('[')[0])}")
EOF
)
# the interpreter's full version: markers such as python_full_version < '3.11.3' (redis needs
# async-timeout below it) decide what gets installed
py_version=$(run_arm -c 'import platform; print(platform.python_version())')
site_key=$(printf '%s %s' "$py_version" "$requirements" | digest)
if ! stamp_ok site "$site_key"; then
  say "installing aarch64 wheels of the project's dependencies"
  platforms=()
  for minor in $(seq 36 -1 17); do platforms+=(--platform "manylinux_2_${minor}_aarch64"); done   # glibc 2.36
  rm -rf "$ENV_DIR/site" "$ENV_DIR/site.tmp"
  printf '%s\n' "$requirements" > "$ENV_DIR/requirements.txt"
  nice -n 19 "$PYTHON" -m pip install -q --no-warn-script-location --target "$ENV_DIR/site.tmp" "${platforms[@]}" \
    --platform manylinux2014_aarch64 --python-version "$py_version" --implementation cp --abi cp311 --abi abi3 --abi none \
    --only-binary=:all: -r "$ENV_DIR/requirements.txt" 2> >(grep -v "^WARNING: Location" >&2)
  # pip evaluates dependency markers with the host interpreter (x86_64, its own 3.11.x), not the
  # target's: add what the markers ask for on aarch64 with this interpreter (redis: async-timeout
  # below 3.11.3), until nothing is missing
  for _ in 1 2 3; do
    missing=$(PY_VERSION=$py_version "$PYTHON" - "$ENV_DIR/site.tmp" <<'EOF'
import os, sys
from importlib.metadata import distributions
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

env = {**default_environment(), "platform_machine": "aarch64", "python_full_version": os.environ["PY_VERSION"],
       "python_version": ".".join(os.environ["PY_VERSION"].split(".")[:2])}
dists = list(distributions(path=[sys.argv[1]]))
have = {canonicalize_name(d.metadata["Name"]) for d in dists}
for dist in dists:
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker is None or "extra" in str(req.marker):
            continue
        if req.marker.evaluate(env) and canonicalize_name(req.name) not in have:
            print(str(req).split(";")[0])
EOF
)
    [ -z "$missing" ] && break
    say "adding for aarch64 / Python $py_version: $missing"
    # shellcheck disable=SC2086
    nice -n 19 "$PYTHON" -m pip install -q --no-warn-script-location --target "$ENV_DIR/site.tmp" "${platforms[@]}" \
      --platform manylinux2014_aarch64 --python-version "$py_version" --implementation cp --abi cp311 --abi abi3 --abi none \
      --only-binary=:all: --no-deps $missing 2> >(grep -v "^WARNING: Location" >&2)
  done
  mv "$ENV_DIR/site.tmp" "$ENV_DIR/site"
  echo "$site_key" > "$ENV_DIR/site.stamp"
fi

# --- the emulated CPU and its /proc/cpuinfo ------------------------------------------------------
# qemu's default "max" CPU offers SVE together with i8mm; there ONNX Runtime's dynamic int8 MatMul
# computes wrong values under qemu 7.2 (cosine 0.44 against x86 on the tests' MLP; exact with
# sve=off, on a64fx (SVE, no i8mm), neoverse-n1 and cortex-a72). Which of the two is at fault
# cannot be told without the hardware, so the worker emulates a real core instead: Neoverse-N1
# (AWS Graviton2, Ampere Altra: NEON, dotprod, fp16 arithmetic; no SVE, no i8mm).
echo "$ARM_CPU" > "$ENV_DIR/cpu"
# its MIDR as the CPU itself reports it (an EL0 read that Linux, and qemu-user, emulate)
printf '#include <stdio.h>\nint main(void) { unsigned long m; __asm__ volatile("mrs %%0, midr_el1" : "=r"(m)); printf("%%lx\\n", m); return 0; }\n' \
  > "$ENV_DIR/midr.c"
aarch64-linux-gnu-gcc -static -O2 "$ENV_DIR/midr.c" -o "$ENV_DIR/midr"
midr=$(qemu-aarch64 -cpu "$ARM_CPU" "$ENV_DIR/midr")
host_model=$(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
rm -f "$SYSROOT/proc/cpuinfo"     # read the real one (the host's) while generating
mkdir -p "$SYSROOT/proc"
# (FW_*, not QEMU_*: qemu-user reads QEMU_* variables as its own options)
FW_HOST_MODEL=${host_model:-an x86_64 host} FW_QEMU_VERSION=$(qemu-aarch64 --version | head -1 | awk '{print $3}') \
  FW_ARM_CPU=$ARM_CPU FW_MIDR=$midr run_arm - > "$ENV_DIR/cpuinfo.tmp" <<'EOF'
import ctypes, os

# the kernel's hwcap_str order (arch/arm64/kernel/cpuinfo.c): AT_HWCAP bits 0-31, AT_HWCAP2 bits 0-14
HWCAP = ("fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc "
         "dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs sb paca pacg").split()
HWCAP2 = ("dcpodp sve2 sveaes svepmull svebitperm svesha3 svesm4 flagm2 frint svei8mm svef32mm svef64mm "
          "svebf16 i8mm bf16").split()
getauxval = ctypes.CDLL(None).getauxval
getauxval.restype = ctypes.c_ulong
hwcap, hwcap2 = getauxval(16), getauxval(26)
features = [n for i, n in enumerate(HWCAP) if hwcap >> i & 1] + [n for i, n in enumerate(HWCAP2) if hwcap2 >> i & 1]
midr = int(os.environ["FW_MIDR"], 16)
env = os.environ
for cpu in range(os.cpu_count() or 1):
    # "model name" is no field of an aarch64 kernel's file; the report's measured_on.cpu_model reads it
    print(f"processor\t: {cpu}\n"
          f"model name\t: emulated aarch64 {env['FW_ARM_CPU']} (qemu-aarch64 {env['FW_QEMU_VERSION']}) on {env['FW_HOST_MODEL']}\n"
          f"BogoMIPS\t: 50.00\nFeatures\t: {' '.join(features)}\n"
          f"CPU implementer\t: 0x{midr >> 24 & 0xff:02x}\nCPU architecture: 8\nCPU variant\t: 0x{midr >> 20 & 0xf:x}\n"
          f"CPU part\t: 0x{midr >> 4 & 0xfff:03x}\nCPU revision\t: {midr & 0xf}\n")
EOF
mv "$ENV_DIR/cpuinfo.tmp" "$SYSROOT/proc/cpuinfo"

# --- our C kernels, cross-compiled -------------------------------------------------------------------
kernels_key=$(cat kernels/src/*.c kernels/src/*.h kernels/include/*.h kernels/build_ffi.py | digest)
kernels_key="$kernels_key $("$PYTHON" -c 'import cffi; print(cffi.__version__)')"
if ! stamp_ok kernels "$kernels_key" || [ ! -f "$ENV_DIR/$(basename $KERNELS_SO)" ]; then
  say "cross-compiling the C kernels for aarch64"
  mkdir -p "$ENV_DIR/kernels-build"
  "$PYTHON" - "$ENV_DIR/kernels-build/_ffi.c" >/dev/null <<'EOF'
import importlib.util, sys
spec = importlib.util.spec_from_file_location("build_ffi", "kernels/build_ffi.py")
build_ffi = importlib.util.module_from_spec(spec)
spec.loader.exec_module(build_ffi)
build_ffi.make_builder(absolute=True).emit_c_code(sys.argv[1])
print(" ".join(build_ffi.EXTRA_COMPILE_ARGS), file=open(sys.argv[1] + ".flags", "w"))
EOF
  # build_ffi's own flags; pyconfig.h comes from the arm64 headers (after the cross libc's)
  # shellcheck disable=SC2046
  nice -n 19 aarch64-linux-gnu-gcc -shared -fPIC $(cat "$ENV_DIR/kernels-build/_ffi.c.flags") \
    -I"$SYSROOT/usr/include/python3.11" -idirafter "$SYSROOT/usr/include" -Ikernels/include -Ikernels/src \
    "$ENV_DIR/kernels-build/_ffi.c" kernels/src/*.c -lm -o "$ENV_DIR/$(basename $KERNELS_SO)"
  echo "$kernels_key" > "$ENV_DIR/kernels.stamp"
fi
cmp -s "$ENV_DIR/$(basename $KERNELS_SO)" "$KERNELS_SO" || cp "$ENV_DIR/$(basename $KERNELS_SO)" "$KERNELS_SO"

say "ready in $ENV_DIR ($(( $(date +%s) - started )) s)"
