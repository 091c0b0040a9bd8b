"""Render deploy/helm/modelium offline with Helm's own engine (helm-python-sdk), one YAML file
per template, for kubernetes-validate and for reading:

    .venv/bin/python scripts/render_chart.py OUT_DIR [VALUES.yaml ...]
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import helm_python
import yaml

CHART = Path(__file__).resolve().parent.parent / "deploy" / "helm" / "modelium"


def render(values: dict[str, Any] | None = None) -> dict[str, str]:
    """Template path -> rendered YAML (NOTES.txt and empty templates left out)."""
    helm_python.disable_logging()
    out = helm_python.Chart.load(CHART).render(values or {}, name="modelium", namespace="modelium")
    return {path: text for path, text in out.items() if path.endswith(".yaml") and text.strip()}


def objects(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    return [doc for text in render(values).values() for doc in yaml.safe_load_all(text) if doc]


def main(argv: list[str]) -> int:
    out = Path(argv[0])
    values: dict[str, Any] = {}
    for path in argv[1:]:
        values.update(yaml.safe_load(Path(path).read_text()) or {})
    out.mkdir(parents=True, exist_ok=True)
    for template, text in render(values).items():
        (out / template.replace("/", "_")).write_text(text)
    print(f"rendered {CHART.name} ({', '.join(argv[1:]) or 'default values'}) into {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
