# Two entry points on a fresh machine: `make repro` (install + run the pipeline) and `make test`.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# torch 2.14.1 + torchvision 0.29.1 are the pair that imports together here (see README).
STAMP := $(VENV)/.installed

.PHONY: install repro test clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The stages run `python -m stages.<name>`: the environment's bin comes first on PATH.
RUN := PATH="$(abspath $(VENV))/bin:$$PATH" DVC_NO_ANALYTICS=1

repro: install
	$(RUN) dvc repro

test: install
	$(RUN) python -m pytest

clean-venv:
	rm -rf $(VENV)
