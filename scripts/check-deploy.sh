#!/usr/bin/env bash
# Checks everything under deploy/ offline (no container engine or cluster is needed):
# yamllint; hadolint on the Dockerfile; `docker-compose config -q` on every compose variant;
# the Helm chart linted and rendered for each values file, then validated with
# kubernetes-validate --strict. The tools come with the `deploy` extra (scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=.venv/bin
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

echo "== yamllint deploy/"
"$bin/yamllint" --strict -c .yamllint.yaml deploy/

echo "== hadolint deploy/docker/Dockerfile"
"$bin/hadolint" deploy/docker/Dockerfile

echo "== docker-compose config"
for variant in "" compose.cpu.yaml compose.dev.yaml; do
  files=(-f deploy/compose/compose.yaml)
  [ -n "$variant" ] && files+=(-f "deploy/compose/$variant")
  "$bin/docker-compose" --project-directory deploy/compose "${files[@]}" config -q
  echo "compose.yaml${variant:+ + $variant}: valid"
done

echo "== helm chart"
"$bin/python" - <<'PY'
import sys
import helm_python
import yaml
helm_python.disable_logging()
for name in ("", "deploy/helm/values-gpu.yaml", "deploy/helm/values-hostpath.yaml"):
    values = yaml.safe_load(open(name)) if name else {}
    report = helm_python.lint("deploy/helm/modelium", values, strict=True)
    bad = [m for m in report["messages"] if m["severity"] >= 2] + [{"error": e} for e in report["errors"]]
    for m in bad:
        print("helm lint:", m.get("path", ""), m["error"])
    if bad:
        sys.exit(1)
print("helm lint --strict: no findings")
PY
for values in "" deploy/helm/values-gpu.yaml deploy/helm/values-hostpath.yaml; do
  dir="$out/$(basename "${values:-default}" .yaml)"
  "$bin/python" scripts/render_chart.py "$dir" $values 2>/dev/null
  "$bin/kubernetes-validate" --strict --quiet "$dir"/*
done
echo "deploy checks passed"
