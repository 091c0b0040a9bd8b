"""Replay recorded histories: a workflow change that would break running workflows fails here."""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer

from workflows.lifecycle import ModelLifecycleWorkflow

HISTORIES = sorted((Path(__file__).parent / "histories").glob("*.json"))


def test_histories_were_recorded() -> None:
    assert {p.name for p in HISTORIES} >= {"lifecycle.json", "failed-then-retried.json"}


@pytest.mark.parametrize("path", HISTORIES, ids=[p.stem for p in HISTORIES])
async def test_replay(path: Path) -> None:
    history = WorkflowHistory.from_json(path.stem, path.read_text())
    await Replayer(workflows=[ModelLifecycleWorkflow]).replay_workflow(history)
