"""STYLE.md's one direction of travel: every module's imports read from its source, and what importing
the layers pulls in, checked in fresh interpreters."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

# What no module of each top-level package may import (cli/ sits on top and may import anything).
FORBIDDEN = {
    "modelium": {"temporalio", "fastapi", "workflows", "activities", "api", "workers", "cli"},
    "workflows": {"activities", "api", "workers", "cli", "torch", "transformers", "httpx", "pynvml", "fastapi"},
    "activities": {"api", "workers", "cli", "fastapi"},
    "api": {"activities", "workers", "cli", "torch", "transformers", "pynvml"},
    "workers": {"cli"},
}


def _modules_after(import_line: str) -> set[str]:
    code = f"import sys, json; {import_line}; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return {m.split(".")[0] for m in json.loads(done.stdout)}


def _imports_of(path: Path) -> set[str]:
    """The top-level names every import statement in the file names, also those inside functions
    (lazy imports) and under `if TYPE_CHECKING:`."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_every_module_keeps_to_its_layer(package: str) -> None:
    """No module of the package, with no exception, imports a layer above it or a library its
    layer must not touch. (What a third-party library imports in turn, Ray Serve's FastAPI for
    one, is checked for the layers where it matters by the fresh-interpreter tests below.)"""
    files = sorted((ROOT / package).rglob("*.py"))
    assert len(files) > 1, f"no modules found under {package}/"
    bad = {
        str(f.relative_to(ROOT)): sorted(FORBIDDEN[package] & _imports_of(f))
        for f in files
        if FORBIDDEN[package] & _imports_of(f)
    }
    assert not bad, f"{package}/ reaches across its layer: {bad}"


def test_workflows_import_no_side_effect_libraries() -> None:
    loaded = _modules_after("import workflows.lifecycle, workflows.contracts")
    assert not loaded & {
        "torch",
        "transformers",
        "httpx",
        "pynvml",
        "fastapi",
        "uvicorn",
        "watchdog",
        "activities",
        "api",
        "workers",
    }


def test_domain_library_imports_no_temporal_or_gateway() -> None:
    loaded = _modules_after(
        "import modelium.config, modelium.analyzer, modelium.brain, modelium.ledger, "
        "modelium.watcher, modelium.metrics, modelium.runtimes.embedded, modelium.types"
    )
    assert not loaded & {"temporalio", "fastapi", "workflows", "activities", "api", "workers", "torch"}


def test_gateway_imports_no_runtime_or_gpu_code() -> None:
    loaded = _modules_after("import api.app")
    assert not loaded & {"torch", "transformers", "pynvml", "activities", "workers"}
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import api.app, sys, json; "
            "print(json.dumps([m for m in sys.modules if m.startswith('modelium.runtimes')]))",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(done.stdout) == []
