# The README's two commands: `make run` and `make test`. `make install` builds .venv alone.
PYTHON ?= python3
VENV   ?= .venv
PORT   ?= 8000
HOST   ?= 127.0.0.1
BIN    := $(VENV)/bin
KERNEL_SOURCES := $(wildcard kernels/src/*.c kernels/src/*.h kernels/include/*.h kernels/build_ffi.py)

.PHONY: install torch run demo test test-unit bench kernels-arm arm-env arm-worker clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py $(KERNEL_SOURCES)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q -e '.[dev,dataset]'
	$(MAKE) --no-print-directory torch
	$(BIN)/python -m pip install -q -e '.[tflite]' || echo "featherweight[tflite] not installed: export tflite unavailable"
	touch $@

# PyTorch CPU, for distill method kd and export pytorch. Optional on a laptop: a failed install leaves a note. Under
# CI=true it fails the build, so the kd tests cannot turn into skips unnoticed.
torch:
	$(BIN)/python -m pip install -q 'torch==2.13.0' || { \
	  if [ "$$CI" = true ]; then echo "torch install failed (CI=true: the distill kd tests need it)" >&2; exit 1; fi; \
	  echo "torch not installed: distill method kd and export pytorch unavailable"; }

run: install
	$(BIN)/featherweight serve --host $(HOST) --port $(PORT)

# A first job: trains a small digit classifier here and runs it through the service that `make run`
# serves (in another terminal) on the same HOST and PORT; results land in demo-output/.
demo: install
	$(BIN)/python -m featherweight.demo --server http://$(HOST):$(PORT) --out demo-output

test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider

test-unit: install
	$(BIN)/python -m pytest -q tests/unit

bench: install
	$(BIN)/python -m bench.kernels
	$(BIN)/python -m bench.quality

# The NEON paths: cross-compile the C library for aarch64 and run its C test driver under qemu-user
# (needs Debian's gcc-aarch64-linux-gnu and qemu-user; .ci/run installs them).
kernels-arm:
	kernels/cross_arm.sh

# A whole cpu-arm worker on aarch64 under qemu-user (deploy/arm/): arm-env builds or refreshes its
# environment (Debian's arm64 python3.11, the dependencies' aarch64 wheels, the cross-built kernels),
# cached in ~/.cache/featherweight-arm (FEATHERWEIGHT_ARM_ENV); arm-worker runs the worker with this
# shell's FEATHERWEIGHT_* settings (the same Postgres, Redis and S3 as the API).
arm-env: install
	PYTHON=$(BIN)/python deploy/arm/build_env.sh

arm-worker: arm-env
	deploy/arm/worker.sh

clean:
	rm -rf $(VENV) build *.egg-info kernels/_ffi.* .pytest_cache demo-output
