# The two commands of the README:
#   make train   set up (first time only), then train `tiny` on the built-in dataset
#   make test    set up (first time only, with the dev extra), then run the test suite
VENV ?= .venv
ARGS ?=

.PHONY: train test setup setup-dev lint

setup:
	@scripts/setup.sh base

setup-dev:
	@scripts/setup.sh dev

train: setup
	$(VENV)/bin/python -m mlx_clip.train $(ARGS)

test: setup-dev
	$(VENV)/bin/python -m pytest -q $(ARGS)

lint: setup-dev
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
