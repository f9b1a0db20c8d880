# Quick start: `make demo` (set up, then train recipes/tiny.yaml), `make test` (set up, run the tests).
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch that this kind of machine carries; clusters bring their own CUDA torch.
TORCH ?= torch==2.13.0

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: setup
	$(VENV)/bin/llmtrain run recipes/tiny.yaml

test: setup
	$(PY) -m pytest -q --durations=25

bench: setup
	$(VENV)/bin/llmtrain bench heads

clean:
	rm -rf $(VENV) .cache runs
