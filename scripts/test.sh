#!/usr/bin/env bash
# Sets up ./.venv (scripts/setup.sh) and runs the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
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
