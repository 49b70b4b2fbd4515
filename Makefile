# dosebench — the two commands a newcomer needs: `make demo` and `make test`.
# Every install step lives here, so a clean clone on a fresh machine works.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

.PHONY: demo test bench lint install install-dev clean

# Stamps record what was installed, so reruns are instant and a changed pyproject reinstalls.
$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip setuptools wheel
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.created
	$(PIP) install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.created
	$(PIP) install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

demo: $(VENV)/.installed
	$(VENV)/bin/dosebench demo --out demo-output --overwrite

test: $(VENV)/.installed-dev
	$(PY) -m ruff check services tests benchmarks
	$(PY) -m pytest

# Figures, not tests. diffct is the peer the projector and backprojector are compared with; it is
# installed here only, never a dependency of dosebench.
bench: $(VENV)/.installed-dev
	$(PIP) install --quiet diffct==2.5.0
	$(PY) -m benchmarks
	$(PY) -m benchmarks.projector --views 16
	$(PY) -m benchmarks.backprojector
	$(PY) -m benchmarks.api_latency
	$(PY) -m benchmarks.cohort_evaluation

lint: $(VENV)/.installed-dev
	$(PY) -m ruff check services tests benchmarks

clean:
	rm -rf $(VENV) demo-output .pytest_cache
