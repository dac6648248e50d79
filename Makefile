# The two commands of the README. Each does its own set-up first (.ci/setup: OS packages when
# root on Debian/Ubuntu, the Kafka jars, a Python venv), so both work on a fresh machine.
.PHONY: setup demo test unit lint clean-sandbox

setup:
	@bash .ci/setup

demo: setup
	.venv/bin/outbox demo

test: setup
	bash .ci/lint
	.venv/bin/pytest

lint: setup
	bash .ci/lint

unit: setup
	.venv/bin/pytest tests/unit

clean-sandbox:
	-.venv/bin/outbox dev down
	-.venv/bin/outbox dev down --dir "$${OUTBOX_TEST_SANDBOX_DIR:-$$( [ "$$(id -u)" = 0 ] && echo /var/lib/outbox-relay/test-sandbox || echo .pytest-sandbox )}"
