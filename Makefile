# Set-up is part of every target: the first run creates .venv and installs IBIX with its test extras.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.ibix-installed

.PHONY: demo test benchmark clean

$(STAMP): pyproject.toml IBIX/Resources/requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e ".[cpu,test,web]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ibix demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest

benchmark: $(STAMP)
	$(VENV)/bin/python Testing/benchmarks/benchmark_mappings.py
	$(VENV)/bin/python Testing/benchmarks/benchmark_atlas.py

clean:
	rm -rf $(VENV) ibix-demo-output .pytest_cache
