# One command each: `make run` starts the service on its default folders,
# `make test` runs lint, types and the whole test suite. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: run test lint browser bench fuzz deploy-check clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/niftidrop run

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks deploy
	$(BIN)/ruff format --check src tests benchmarks deploy
	$(BIN)/mypy

# The status page's browser test renders it in Debian's chromium: installed here
# when missing and run as root (as in CI); elsewhere that test says why it skips.
browser:
	@command -v chromium >/dev/null || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null \
		|| { apt-get update -q >/dev/null \
		&& DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; } \
		|| echo "chromium could not be installed: the browser test will say so and skip"

test: lint browser
	$(BIN)/pytest --cov --cov-report=term

bench: $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	$(BIN)/python -m benchmarks

# The long fuzz profile (200,000 hostile files; tens of minutes). `make test` runs a
# fixed set of 2,400 of them; `make bench` does not run this.
fuzz: $(STAMP)
	$(BIN)/python -m benchmarks fuzz

# Builds and runs the Dockerfile and the systemd unit with podman (as root on
# Debian; README, "Deployment"). .ci/run runs it after `make test`.
deploy-check: $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev,deploy]'
	bash deploy/ci.sh

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
