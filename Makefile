# Two entry points on a fresh machine: `make repro` (install + run the pipeline) and `make test`.
# pyproject.toml states compatible ranges (a user's own CUDA build of torch is kept); the default
# environment is pinned by constraints.txt (`make lock` rewrites it from the current .venv).
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install repro test lock clean-venv

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-compile -c constraints.txt -e '.[dev]'  # no .pyc for all of the 6 GB: the runs below compile what they import, once
	touch $(STAMP)

install: $(STAMP)

# The stages run `python -m stages.<name>`: the environment's bin comes first on PATH. Every stage (and every
# test subprocess) is a new Python process: with PYTHONDONTWRITEBYTECODE set (as on these machines) each one
# would compile torch's modules from source again (~2.5-4 s a process); cleared, the first one writes the .pyc
# files of what is imported and the others reuse them.
RUN := PATH="$(abspath $(VENV))/bin:$$PATH" DVC_NO_ANALYTICS=1 PYTHONDONTWRITEBYTECODE=

repro: install
	$(RUN) dvc repro

test: install
	$(RUN) python -m pytest

lock: install
	$(PY) -m pip freeze --exclude-editable > constraints.txt

clean-venv:
	rm -rf $(VENV)
