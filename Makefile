# Two commands on a fresh machine:
#   make demo   set up .venv and run the demo (train, segment, score)
#   make test   set up .venv and run the whole test suite
# and, once set up, the STT-UNET model on the same data, or the demo as two
# JAX processes joined by jax.distributed:
#   make demo-stt
#   make demo-processes
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo demo-stt demo-processes test setup clean

$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m stt_jax.main --config=configs/demo.py --workdir=runs/demo --overwrite

demo-stt: $(STAMP)
	$(PY) -m stt_jax.main --config=configs/demo_stt.py --workdir=runs/demo_stt --overwrite

# two JAX processes on this machine (CPU), joined by jax.distributed
demo-processes: $(STAMP)
	JAX_PLATFORMS=cpu bash launch/processes.sh 2 configs/demo.py runs/demo_2proc --overwrite

# two pytest workers, one test file each at a time (a file's tests share
# compiled programs): 11 min instead of 14 on the 2-core CI machine; the
# suite compiles at LLVM -O0 (tests/conftest.py): 8 min 46 s instead of 12 min 47 s
# (571 tests: 12.5 min in CI, session 42); --durations lists the slowest
# tests, so the log says where the 15-minute budget goes
test: $(STAMP)
	XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu \
	  $(PY) -m pytest -q -n 2 --dist=loadfile --durations=15 tests

clean:
	rm -rf $(VENV) runs
