# siterecovery — the two commands of the README, and a few more.
.PHONY: demo test setup setup-test lint unit bench bench-quick bench-vault clean

demo: setup
	.venv/bin/siterecovery demo

test: setup-test
	.venv/bin/ruff check siterecovery tests bench scripts
	.venv/bin/mypy
	.venv/bin/mypy bench tests/bench
	.venv/bin/pytest -ra
	# The vault, its API and the agent again, on PostgreSQL (a private cluster on 127.0.0.1).
	SITERECOVERY_TEST_DATABASE_URL=$$(bash scripts/setup-postgres.sh) \
	  .venv/bin/pytest -ra -q tests/vault tests/api tests/agent

setup:
	bash scripts/setup.sh runtime

setup-test:
	bash scripts/setup.sh test

lint: setup-test
	.venv/bin/ruff check siterecovery tests bench scripts
	.venv/bin/ruff format --check siterecovery tests bench
	.venv/bin/mypy
	.venv/bin/mypy bench tests/bench

unit: setup-test
	.venv/bin/pytest -ra -m "not slow"

bench: setup
	bash scripts/bench-setup.sh
	.venv/bin/python -m bench.run

bench-quick: setup
	bash scripts/bench-setup.sh
	.venv/bin/python -m bench.run --quick

bench-vault: setup
	.venv/bin/python -m bench.vault_load --backend both

clean:
	rm -rf .venv build *.egg-info .pytest_cache .mypy_cache .ruff_cache
