# `make demo` runs the main job (the offline demo); `make test` runs the tests. Each sets itself up.
.PHONY: setup demo test

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/loralab demo --out outputs/demo

test: setup
	.venv/bin/python -m pytest -q
