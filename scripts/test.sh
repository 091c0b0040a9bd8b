#!/usr/bin/env bash
# Sets up ./.venv (scripts/setup.sh) and runs the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The dashboard's browser tests (tests/integration/test_dashboard.py) use Debian's Chromium; as
# root with apt-get it is installed here, once (Playwright's own browser download is not used).
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing Debian's chromium for the dashboard's browser tests"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
# Static checks first: lint, format and types (STYLE.md), then the tests.
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
# deploy/ checked offline: compose files, Dockerfile, Helm chart, Kubernetes schemas.
bash scripts/check-deploy.sh
# Tests run in MODELIUM_TEST_WORKERS processes (default 2; 0 runs them in this one), each with its
# own Temporal dev server. The tests of one file run on one worker, one after another (the Ray
# tests look for Ray's daemons machine-wide; xdist's loadgroup did not keep groups together
# under pytest 9.2).
exec .venv/bin/python -m pytest -n "${MODELIUM_TEST_WORKERS:-2}" --dist loadfile "$@"
