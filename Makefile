# `make test` and `make demo` each create .venv and install what they need; a second run installs nothing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch that lies on this machine's disk; a bare `torch` would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
EXTRAS := export,test,bench,demo,executorch
STAMP := $(VENV)/.vqcore-installed
# The out-of-tree example plugin (docs/plugins.md), installed editable so that the tests see it through
# real entry-point discovery (tests/test_plugin_example.py); it is not part of the vqcore wheel.
EXAMPLE_PLUGIN := examples/vqcore-plugin-example

.PHONY: test test-slow consumers demo bench lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml $(EXAMPLE_PLUGIN)/pyproject.toml | $(PY)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	$(PY) -m pip install --quiet --no-deps -e $(EXAMPLE_PLUGIN)
	touch $(STAMP)

test: $(STAMP)
	$(VENV)/bin/pytest -q tests $(EXAMPLE_PLUGIN)/tests

# the heavy cases, the consumers outside Python among them (C++, Node.js, headless Chromium): they must
# run here, not skip
test-slow: $(STAMP) consumers
	VQCORE_REQUIRE_CONSUMERS=1 $(VENV)/bin/pytest -q -m slow

# what the consumer tests need besides .venv: the npm packages of examples/node and examples/web
# (--ignore-scripts: onnxruntime-node's post-install step downloads GPU binaries from outside; its CPU
# binding is in the package) and Debian's chromium for the headless browser tests (as root)
NODE_MODULES := examples/node/node_modules/.package-lock.json examples/web/node_modules/.package-lock.json

consumers: $(NODE_MODULES)
	@command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }

examples/%/node_modules/.package-lock.json: examples/%/package-lock.json
	cd examples/$* && npm ci --ignore-scripts --no-audit --no-fund

demo: $(STAMP)
	$(VENV)/bin/vqcore demo

# side by side with vector-quantize-pytorch 1.32.0; each writes its table under benchmarks/results/
bench: $(STAMP)
	$(PY) benchmarks/bench_vq.py
	$(PY) benchmarks/bench_rvq.py
	$(PY) benchmarks/bench_lfq.py
	$(PY) benchmarks/bench_fsq.py
	$(PY) benchmarks/bench_scalar_new.py
	$(PY) benchmarks/bench_latent.py
	$(PY) benchmarks/bench_saved.py
	$(PY) benchmarks/bench_beam.py
	$(PY) benchmarks/bench_qinco.py
	$(PY) benchmarks/bench_sim_vq.py
	$(PY) benchmarks/bench_hierarchical_vq.py
	$(PY) benchmarks/bench_vq_codebook_options.py
	$(PY) benchmarks/bench_vq_loss_options.py
	$(PY) benchmarks/bench_monitor.py
	$(PY) benchmarks/bench_export.py
	$(PY) benchmarks/bench_faiss.py
	$(PY) benchmarks/bench_fast_path.py
	$(PY) benchmarks/bench_quality.py

# ruff, then mypy over vqcore, vqcore.plugins and vqcore.export (tools/typecheck.py lays them out as installed)
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) tools/typecheck.py

clean:
	rm -rf $(VENV) build dist *.egg-info examples/node/node_modules examples/web/node_modules
