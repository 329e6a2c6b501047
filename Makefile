.PHONY: run test setup lint fast bench

run:  ## set up and run the whole platform on 127.0.0.1 (Ctrl-C stops it)
	@scripts/run.sh

test:  ## set up, run the gates and the whole suite
	@scripts/test.sh

setup:
	@scripts/setup.sh

lint:
	@.venv/bin/ruff check . && .venv/bin/ruff format --check . && .venv/bin/mypy . && scripts/panic_scan.sh && scripts/ratio_check.sh

fast:  ## the suite without the tests that start processes
	@.venv/bin/python -m pytest -m "not slow"
