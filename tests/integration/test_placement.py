"""Two node agents with different capacities, one control plane: models land where they fit.

Both node agents run here, on CPU, each with its own memory budget (what a CPU-only node books
against); the control worker places by best fit from their announced inventories.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import httpx
import pytest
from temporalio.testing import WorkflowEnvironment

from modelium.ledger import Ledger
from tests.helpers import copy_model, make_settings, running_modelium, unique, wait_for

pytestmark = pytest.mark.slow

MIB = 2**20


async def test_models_land_where_they_fit(
    temporal_env: WorkflowEnvironment, demo_models: dict[str, Path], tmp_path: Path
) -> None:
    # The demo GPT-2 is estimated at about 400 MiB: node "small" has room for one, "large" for four.
    small = make_settings(
        tmp_path / "small", node={"id": unique("small"), "cpu_memory_budget_bytes": 560 * MIB, "announce_seconds": 0.5}
    )
    large = make_settings(
        tmp_path / "large",
        node={"id": unique("large"), "cpu_memory_budget_bytes": 1700 * MIB, "announce_seconds": 0.5},
        temporal={"control_task_queue": small.temporal.control_task_queue},
    )
    client = temporal_env.client
    names = [unique(f"placed-{i}") for i in range(4)]
    async with (
        running_modelium(small, client) as running,
        running_modelium(large, client, gateway=False, control=False, watch=False),
    ):
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{running.gateway_port}", timeout=60) as http:
            for name in names:
                copy_model(demo_models["text-generation"], small.watch_directories[0] / name)

            async def all_loaded() -> list[dict[str, object]] | None:
                infos = [(await http.get(f"/models/{n}")).json() for n in names]
                return infos if all(i.get("phase") == "loaded" for i in infos) else None

            infos = await wait_for(all_loaded, timeout=240, what="four models loaded")
            where = Counter(str(i["node"]) for i in infos)
            assert where == {small.node.id: 1, large.node.id: 3}, where
            for info in infos:
                assert "fits it best" in str(info["decision_reason"])
            # Each node's ledger, as its file says: the models placed there, within its budget.
            for settings, budget in ((small, 560 * MIB), (large, 1700 * MIB)):
                path = settings.state_dir / "nodes" / settings.node.id / "bookings.json"
                bookings = Ledger(path, settings.node.id, {"cpu": budget}).bookings()
                assert sorted(b.model for b in bookings) == sorted(
                    str(i["name"]) for i in infos if i["node"] == settings.node.id
                )
                assert 0 < sum(b.bytes for b in bookings) <= budget, (settings.node.id, bookings)
            assert running.node is not None
            assert running.node.ledger.booked("cpu") <= 560 * MIB
            answers = await asyncio.gather(
                *(http.post(f"/predict/{n}", json={"prompt": "Hi", "max_tokens": 2}) for n in names)
            )
            assert [a.status_code for a in answers] == [200] * 4
