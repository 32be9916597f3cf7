# Two commands on a fresh machine: `make demo` runs the main job, `make test` runs the test suite.
# Each creates .venv and installs the package with the tested, locked versions (constraints.txt,
# which pins torch 2.13.0); pyproject.toml itself keeps version ranges.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test install clean

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/p3o demo --output_dir runs/demo --overwrite

test: $(BIN)/.installed
	$(BIN)/python -m pytest -n 2 -q

clean:
	rm -rf $(VENV) runs
