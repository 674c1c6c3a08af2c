# Every target creates .venv when it is missing (a fresh machine needs only Python 3.11).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CORE := $(VENV)/.installed-core
FULL := $(VENV)/.installed-full
WORKDIR ?= runs/demo
# glibc backs XLA:CPU's large buffers with transparent huge pages (jaxres/hostmem.py; the CPU
# train step 1.3-1.4x faster): set here, so the scripts need not restart themselves for it.
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1

.PHONY: venv venv-full demo test smoke-core bench fmt clean

venv: $(CORE)
venv-full: $(FULL)

# Core + dev tools: enough to train, evaluate, probe and run the demo.
$(CORE): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# + TensorFlow (dataset preparation through tfds), torch / timm / Keras
# (weight-import parity), DALI (its decoder runs on the CPU too) and TensorBoard (reads the
# runs' events back): the test suite exercises all.
$(FULL): $(CORE)
	$(PY) -m pip install -q -e '.[dev,prepare,convert,dali,tensorboard]'
	touch $@

# Train on the embedded digits dataset, evaluate the best checkpoint, run a
# linear probe on its features and print the results table.
demo: venv
	$(PY) scripts/demo.py --workdir $(WORKDIR)

# pytest exits 5 when it collected no tests: that must fail, not pass. Two workers (one per
# core of the 2-core machines): compiling, imports and subprocess start-up are single-threaded.
test: venv-full
	$(PY) -m pytest -q -p no:cacheprovider -n 2 --dist loadfile tests; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "no tests were collected" >&2; exit 1; fi; exit $$rc

# Every README command that needs no extra, in a separate venv with only the core install
# (+ dev): the full venv of `make test` hides a dependency only an extra brings in.
VENV_CORE := .venv-core
$(VENV_CORE)/.installed-core: pyproject.toml
	test -x $(VENV_CORE)/bin/python || $(PYTHON) -m venv $(VENV_CORE)
	$(VENV_CORE)/bin/python -m pip install -q --upgrade pip
	$(VENV_CORE)/bin/python -m pip install -q -e '.[dev]'
	touch $@

smoke-core: $(VENV_CORE)/.installed-core
	bash scripts/smoke_core.sh $(VENV_CORE)/bin/python

bench: venv
	$(PY) scripts/benchmark.py --what train --model resnetv2_50 --batch_size 32 --steps 5 --warmup 2 --dtype float32

fmt: venv
	$(PY) -m ruff format jaxres scripts tests configs

clean:
	rm -rf $(VENV) $(VENV_CORE) runs
