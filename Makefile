# The two commands a newcomer needs: `make run` and `make test`. See README.md.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
HOME_DIR ?= $(CURDIR)/.ftmllm

.PHONY: run test test-vllm lint bench engines venv clean help

help:
	@echo "make run    start ftmllmd in the foreground with everything under ./.ftmllm/"
	@echo "make test   install what the tests need (engines cached in ~/.cache/ftmllm-test) and run them all"
	@echo "make lint   ruff, mypy and the import contracts (lint-imports)"
	@echo "make bench  run the benchmarks in bench/ (each ends with one key=value line)"

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,ray]'
	rm -f $(VENV)/.installed-* && touch $@

venv: $(STAMP)

run: $(STAMP)
	@mkdir -p $(HOME_DIR)
	@echo "ftmllmd: everything lives under $(HOME_DIR)"
	@echo "  drop PDFs into  $(HOME_DIR)/inbox   (Markdown appears in $(HOME_DIR)/outbox)"
	@echo "  watch it with   FTMLLM_HOME=$(HOME_DIR) $(BIN)/ftui      (or $(BIN)/ftctl --home $(HOME_DIR) status)"
	@echo "  stop it with    Ctrl-C"
	$(BIN)/ftmllmd --home $(HOME_DIR)

engines: $(STAMP)
	$(BIN)/python tests/engines/venvs.py ensure all

test: $(STAMP) engines
	$(BIN)/python -m pytest -q -p no:cacheprovider

# only the real-vLLM acceptance tests (a few minutes)
test-vllm: $(STAMP) engines
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/vllm

lint: $(STAMP)
	$(BIN)/ruff check daemon shared tui tests bench tools
	$(BIN)/mypy
	$(BIN)/lint-imports

bench: $(STAMP) engines
	@for b in $(filter-out bench/__init__.py,$(sort $(wildcard bench/*.py))); do \
		echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .ftmllm .mypy_cache .ruff_cache .import_linter_cache
