"""Replay recorded histories: a workflow change that would break running workflows fails here.

`lifecycle` and `failed-then-retried` were recorded before the patched branches existed (demand,
local control steps, interruptible loads, restart backoff, waking waiters on release, listing
since): they prove old workflows still replay. The others (tests/workflows/histories/record.py)
go through every patched branch: preload, idle unload, request and API updates, pin, eviction,
waiting for capacity and being woken, a crashed runtime restarted after its backoff."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer

from tests.helpers import ROOT
from workflows.lifecycle import ModelLifecycleWorkflow
from workflows.nodes import NodeRegistryWorkflow

HISTORIES = sorted((ROOT / "tests" / "workflows" / "histories").glob("*.json"))


RECORDED = {"lifecycle", "failed-then-retried"} | {
    "lifecycle-v2", "failed-then-retried-v2", "evicted", "evictor", "holder", "waited", "restarted", "node"
}  # fmt: skip
# Every patch the workflow code can take, read from its source: a new one fails the test below
# until a recorded history takes it.
PATCHES = {
    m for f in (ROOT / "workflows").glob("*.py") for m in re.findall(r'workflow\.patched\("([^"]+)"\)', f.read_text())
}


def _patches(history: WorkflowHistory) -> set[str]:
    """The patch ids the history's workflow took (Temporal records each as a marker)."""
    events = history.events
    markers = [e.marker_recorded_event_attributes for e in events if e.HasField("marker_recorded_event_attributes")]
    patches = [m.details["patch-data"].payloads[0].data for m in markers if m.marker_name == "core_patch"]
    return {json.loads(data)["id"] for data in patches}


def test_histories_were_recorded_through_every_patched_branch() -> None:
    assert {p.stem for p in HISTORIES} >= RECORDED
    taken = set().union(*(_patches(WorkflowHistory.from_json(p.stem, p.read_text())) for p in HISTORIES))
    assert taken == PATCHES, f"no recorded history takes {PATCHES - taken}; run the recorder"


@pytest.mark.parametrize("path", HISTORIES, ids=[p.stem for p in HISTORIES])
async def test_replay(path: Path) -> None:
    history = WorkflowHistory.from_json(path.stem, path.read_text())
    await Replayer(workflows=[ModelLifecycleWorkflow, NodeRegistryWorkflow]).replay_workflow(history)
