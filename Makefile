# The README's two commands: `make run` and `make test`. `make install` builds .venv alone.
PYTHON ?= python3
VENV   ?= .venv
PORT   ?= 8000
HOST   ?= 127.0.0.1
BIN    := $(VENV)/bin
KERNEL_SOURCES := $(wildcard kernels/src/*.c kernels/src/*.h kernels/include/*.h kernels/build_ffi.py)

.PHONY: install run test test-unit bench kernels-arm clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py $(KERNEL_SOURCES)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q -e '.[dev,dataset]'
	$(BIN)/python -m pip install -q 'torch==2.13.0' || echo "torch not installed: distill method kd and export pytorch unavailable"
	$(BIN)/python -m pip install -q -e '.[tflite]' || echo "featherweight[tflite] not installed: export tflite unavailable"
	touch $@

run: install
	$(BIN)/featherweight serve --host $(HOST) --port $(PORT)

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

clean:
	rm -rf $(VENV) build *.egg-info kernels/_ffi.* .pytest_cache
