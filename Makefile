# Set-up is part of every target: the first run creates .venv and installs IBIX with its test extras.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.ibix-installed

LOWER := .venv-lower
LOWER_STAMP := $(LOWER)/.ibix-installed

.PHONY: demo test test-lower-bounds benchmark clean

$(STAMP): pyproject.toml IBIX/Resources/requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e ".[cpu,test,web]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ibix demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest

# The declared minimums together: every engine dependency at its lower bound (Testing/lower_bounds.py), then the
# tests (those that build their own environments from PyPI excepted).
$(LOWER_STAMP): pyproject.toml IBIX/Resources/requirements.txt Testing/lower_bounds.py
	rm -rf $(LOWER)
	$(PYTHON) -m venv $(LOWER)
	$(LOWER)/bin/python -m pip install --quiet --upgrade pip
	$(LOWER)/bin/python Testing/lower_bounds.py > $(LOWER)/constraints.txt
	$(LOWER)/bin/python -m pip install --quiet --only-binary=:all: -e ".[cpu,test]" -c $(LOWER)/constraints.txt
	touch $(LOWER_STAMP)

test-lower-bounds: $(LOWER_STAMP)
	$(LOWER)/bin/python -m pip list --format=freeze | grep -i -E "^($$(cut -d= -f1 $(LOWER)/constraints.txt | paste -sd'|'))=="
	$(LOWER)/bin/python -m pytest -m "not pypi"

benchmark: $(STAMP)
	$(VENV)/bin/python Testing/benchmarks/benchmark_mappings.py
	$(VENV)/bin/python Testing/benchmarks/benchmark_atlas.py

clean:
	rm -rf $(VENV) $(LOWER) ibix-demo-output .pytest_cache
