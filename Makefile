# Two commands for a new user; each installs what it needs into .venv first.
#   make demo   the main job
#   make test   the test suite
# Knobs: PYTHON (the interpreter for the venv), TORCH_SPEC (the torch to install), TORCH_CUDA_ARCH_LIST.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PY := $(VENV)/bin/python
SOURCES := setup.py pyproject.toml $(shell find csrc -type f)

.PHONY: demo test bench install clean demo-reference

demo: $(VENV)/.built
	$(PY) -m aecr_model demo --out demo_out

test: $(VENV)/.built
	$(PY) -m pytest tests -q

# The benchmark suite at full size; BENCH_ARGS adds pytest options: --bench-save keeps the run in
# benchmarks/results/<machine kind>/, --bench-compare-last compares with the last one committed there.
bench: $(VENV)/.built
	$(PY) -m pytest benchmarks --benchmark-only $(BENCH_ARGS)

# The demo's reference network, aecr_model/assets/demo_reference.pt (float16) and its training log: the demo's
# recipe on the demo's training data for 4000 steps, then 2000 more under a cosine schedule over 6000 (about an
# hour on 2 cores). The shipped one was trained so, in one process per phase, with held-out evaluations logged.
demo-reference: $(VENV)/.built
	$(PY) -m aecr_model demo --steps 4000 --no-reference --no-progress --out demo_reference
	$(PY) -m aecr_model train --data demo_reference/data/train --out demo_reference/run --steps 6000 \
		--batch-size 4 --crop 64 --lr 2e-3 --cr-weight 0 --seed 0 --cache-images --log-every 50 --no-progress \
		--resume demo_reference/run/last.pt
	$(PY) -c "from aecr_model.demo import write_reference_checkpoint as w; \
		w('demo_reference/run/last.pt', 'aecr_model/assets/demo_reference.pt')"

install: $(VENV)/.built

$(VENV)/.deps:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip setuptools wheel
	$(PY) -m pip install $(TORCH_SPEC) ninja pybind11 numpy pytest pytest-benchmark pillow tqdm h5py onnx onnxscript onnxruntime
	touch $@

$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(PY) -m pip install --no-build-isolation --no-deps -e .
	touch $@

clean:
	rm -rf build $(VENV) aecr_ops/_C*.so *.egg-info
