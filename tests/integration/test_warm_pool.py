"""The embedded runtime's warm pool, against real runtime processes: a load is handed to a spare
that imported torch and transformers ahead of it, a replacement is started, the pool's measured
memory is booked in the CPU budget, and spares never outlive their node agent (stopped with it,
or by the next one when it was killed)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
from temporalio.testing import WorkflowEnvironment

from modelium.config import EmbeddedRuntime
from modelium.gpu import process_tree, resident_bytes
from modelium.ledger import Ledger
from modelium.runtimes.embedded import EmbeddedRuntimeAdapter
from modelium.runtimes.process import pid_alive
from modelium.runtimes.warm_pool import DEFAULT_SPARE_BYTES, POOL_BOOKING
from modelium.types import Booking, LoadRequest
from tests.helpers import copy_model, make_settings, running_modelium, unique, wait_for, wait_phase

MIB = 2**20


async def test_a_load_is_handed_to_a_warm_spare_and_a_new_one_is_started(
    temporal_env: WorkflowEnvironment, demo_models: dict[str, Path], tmp_path: Path
) -> None:
    settings = make_settings(tmp_path, runtimes={"embedded": {"warm_pool": 1}})
    name, broken = unique("pooled"), unique("mismatched")
    async with running_modelium(settings, temporal_env.client) as running:
        assert running.node is not None
        embedded = running.node.adapters["embedded"]
        assert isinstance(embedded, EmbeddedRuntimeAdapter)
        ledger = running.node.ledger
        await wait_for(lambda: embedded.pool.ready() != [], timeout=60, what="a ready spare")
        [spare] = embedded.pool.ready()
        # Booked at what the ready spare holds, not the estimate it was booked at first.
        booking = ledger.get(POOL_BOOKING)
        assert booking is not None and booking.device == "cpu" and booking.bytes != DEFAULT_SPARE_BYTES
        held = resident_bytes(process_tree(spare))
        assert abs(booking.bytes - held) < 0.1 * held, (booking.bytes, held)

        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{running.gateway_port}", timeout=120) as http:

            async def announced() -> bool:
                # The node announces its bookings (here: the pool's alone) soon after a change.
                listed = (await http.get("/nodes")).json()
                cpu = [d for n in listed["nodes"] for d in n["devices"] if d["device"] == "cpu"]
                return [d["booked_bytes"] for d in cpu] == [booking.bytes]

            await wait_for(announced, timeout=30, what="GET /nodes to count the pool's booking")

            copy_model(demo_models["text-generation"], settings.watch_directories[0] / name)
            info = await wait_phase(http, name, "loaded", timeout=120)
            # The spare is the model's runtime now, and its output went to the model's log.
            assert info["endpoint"]["pid"] == spare
            log = (settings.state_dir / "nodes" / settings.node.id / "logs" / f"{name}.log").read_text()
            assert f"warm spare pid {spare}" in log and f"loading {name}" in log, log
            answer = await http.post("/v1/completions", json={"model": name, "prompt": "Hi", "max_tokens": 3})
            assert answer.status_code == 200, answer.text
            assert answer.json()["usage"]["completion_tokens"] == 3
            # A new spare replaces it, within the same booking.
            await wait_for(lambda: embedded.pool.ready() not in ([], [spare]), timeout=60, what="a new spare")
            [second] = embedded.pool.ready()
            assert ledger.get(POOL_BOOKING) is not None

            # A model that fails to load in a spare fails with the runtime's words, and the
            # spare that tried is stopped (anything may be left in it), never reused.
            staged = tmp_path / "staged"
            copy_model(demo_models["text-generation"], staged)
            config = json.loads((staged / "config.json").read_text())
            config["n_embd"] *= 2
            (staged / "config.json").write_text(json.dumps(config))
            staged.rename(settings.watch_directories[0] / broken)
            failed = await wait_phase(http, broken, "failed", timeout=180)
            assert "ignore_mismatched_sizes" in failed["last_error"], failed["last_error"]
            assert not pid_alive(second)
            await wait_for(lambda: embedded.pool.ready() not in ([], [second]), timeout=60, what="a third spare")
            [third] = embedded.pool.ready()
            # The served model is untouched.
            answer = await http.post("/v1/completions", json={"model": name, "prompt": "Hi", "max_tokens": 1})
            assert answer.status_code == 200, answer.text
    # Stopped with the node agent: the spare, the model's runtime, and the pool's booking.
    assert not pid_alive(third) and not pid_alive(spare)
    bookings = json.loads((settings.state_dir / "nodes" / settings.node.id / "bookings.json").read_text())
    assert POOL_BOOKING not in bookings["bookings"]


async def test_a_killed_agents_spares_are_stopped_by_the_next_one(tmp_path: Path) -> None:
    config = EmbeddedRuntime(warm_pool=1, cpu_threads=1)
    records = tmp_path / "runtimes"
    first = EmbeddedRuntimeAdapter("n1", tmp_path / "logs", config, state_dir=records)
    first.start_pool()
    await wait_for(lambda: first.pool.ready() != [], timeout=60, what="a ready spare")
    [left] = first.pool.ready()
    # The first agent was killed: nothing stopped its spare, which lives on in its own group.
    second = EmbeddedRuntimeAdapter("n1", tmp_path / "logs", config, state_dir=records)
    try:
        assert await second.adopt() == []
        assert not pid_alive(left)
        assert list(records.glob("*.json")) == []
    finally:
        await second.stop_all()
        await first.stop_all()


async def test_no_room_for_the_pool_means_cold_loads_that_still_work(
    demo_models: dict[str, Path], tmp_path: Path
) -> None:
    ledger = Ledger(tmp_path / "bookings.json", "n1", {"cpu": 200 * MIB})
    adapter = EmbeddedRuntimeAdapter("n1", tmp_path / "logs", EmbeddedRuntime(warm_pool=1, cpu_threads=1))
    adapter.start_pool(ledger)
    try:
        assert adapter.pool.pids() == [] and ledger.get(POOL_BOOKING) is None
        assert adapter.pool.cold_reason is not None and "no room in the CPU budget" in adapter.pool.cold_reason
        model = copy_model(demo_models["text-generation"], tmp_path / "m")
        request = LoadRequest(
            "m", str(model), "embedded", "text-generation", Booking(model="m", node="n1", device="cpu", bytes=MIB)
        )
        endpoint = await adapter.start(request, progress=lambda *_: None)
        async with httpx.AsyncClient(timeout=60) as http:
            answer = await http.post(f"{endpoint.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 1})
        assert answer.status_code == 200, answer.text
        assert "warm spare" not in adapter.log_path("m").read_text()
    finally:
        await adapter.stop_all()
