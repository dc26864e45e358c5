# The README's commands. Arguments for train.py go in ARGS: make train ARGS="model=dense"
.PHONY: setup train test test-slow bench gpu-check

setup:
	bash scripts/setup.sh

train: setup
	.venv/bin/python train.py $(ARGS)

# Two workers, one thread each (and in the processes they start): the tests' models are tiny, so one
# thread per worker wastes less than two threads sharing one test, and two workers of two threads each
# would fight over the 2 cores; worksteal keeps both busy when the longest tests land on one.
# Measured: docs/testing.md.
# MARKERS picks the tests: the default suite; `make test-slow` the slow ones; `make test MARKERS=` every
# test in one session (CI: one collection, and tests/conftest.py starts each worker on its slow tests).
MARKERS ?= not slow
test: setup
	OMP_NUM_THREADS=1 .venv/bin/python -m pytest -m "$(MARKERS)" -n 2 --dist worksteal --durations=15 $(ARGS)

test-slow:
	$(MAKE) test MARKERS=slow

bench: setup
	.venv/bin/python scripts/bench_moe.py $(ARGS)

# On a CUDA GPU: the expert operator, GPT-2 small dense vs MoE speed, FSDP2, falling losses (docs/gpu.md);
# on a CPU the same parts at a tiny size, in seconds. Writes gpu_check.json here.
gpu-check: setup
	.venv/bin/python scripts/gpu_check.py $(ARGS)
