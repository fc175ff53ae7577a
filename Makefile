# `make demo`: train ACR on the embedded synthetic dataset; the first run also pre-trains the stand-in backbone
# (docs/demo.md; its budget: benchmarks/demo_budget.py).
# `make test`: the test suite. Both create .venv and install the project with its test extras on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install clean rehearse

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) ray_jobs/train.py $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# `make rehearse`: cluster.yaml's workflow on a local autoscaling cluster (tests/rehearsal.py), about 15 minutes.
rehearse: $(STAMP)
	$(PY) -m tests.rehearsal $(ARGS)

clean:
	rm -rf $(VENV) outputs .pytest_cache
