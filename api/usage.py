"""Counts requests per model (and organization) and sends them to the model's workflow.

One `record_usage` signal per model per flush interval keeps workflow histories bounded at any
request rate; with an interval of 0 every request is sent as its own signal, as it happens.
Counts that could not be sent are kept and sent with the next flush: nothing is lost. Counts still
unsent when the gateway stops (Temporal was down) are written to the spool directory and sent by
the next gateway that starts on it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import uuid
from collections import Counter
from pathlib import Path

from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from modelium.names import workflow_id
from workflows.contracts import UsageReport
from workflows.lifecycle import ModelLifecycleWorkflow

log = logging.getLogger(__name__)


class UsageBatcher:
    def __init__(self, client: Client, flush_seconds: float, spool: Path | None = None) -> None:
        self._client = client
        self._flush_seconds = flush_seconds
        self._spool = spool
        self._counts: Counter[tuple[str, str]] = Counter()
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self.signals_sent = 0

    def record(self, model: str, organization: str, count: int = 1) -> None:
        self._counts[(model, organization)] += count
        if self._flush_seconds == 0:
            self._wake.set()

    def pending(self) -> dict[tuple[str, str], int]:
        """Counts not sent yet, by (model, organization)."""
        return dict(self._counts)

    def start(self) -> None:
        self._take_spooled()
        self._task = asyncio.create_task(self._run(), name="usage-flush")

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await self._task
        await self.flush()
        self._spool_unsent()

    def _spool_unsent(self) -> None:
        if not self._counts or self._spool is None:
            return
        self._spool.mkdir(parents=True, exist_ok=True)
        path = self._spool / f"usage-{uuid.uuid4().hex}.json"
        rows = [[model, org, n] for (model, org), n in sorted(self._counts.items())]
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(rows), encoding="utf-8")
        os.replace(tmp, path)
        log.warning(
            "usage of %d requests could not be sent to Temporal; kept in %s for the next start",
            sum(self._counts.values()),
            path,
        )
        self._counts.clear()

    def _take_spooled(self) -> None:
        """Counts an earlier gateway could not send: claimed (renamed, so that two gateways on one
        state directory never both send a file), then sent with the first flush."""
        if self._spool is None or not self._spool.is_dir():
            return
        for path in sorted(self._spool.glob("usage-*.json")):
            claimed = path.with_name(f"{path.stem}.claimed-{os.getpid()}")
            taken = 0
            try:
                os.rename(path, claimed)
                for model, org, n in json.loads(claimed.read_text(encoding="utf-8")):
                    if isinstance(model, str) and isinstance(org, str) and isinstance(n, int) and n > 0:
                        self._counts[(model, org)] += n
                        taken += n
            except (OSError, ValueError, TypeError) as exc:
                log.warning("unreadable spooled usage %s left aside: %s", path, exc)
                continue
            claimed.unlink(missing_ok=True)
            log.info("usage of %d requests spooled by an earlier gateway will be sent", taken)
        if self._counts:
            self._wake.set()

    async def _run(self) -> None:
        while not self._stopping:
            try:
                timeout = None if self._flush_seconds == 0 else self._flush_seconds
                await asyncio.wait_for(self._wake.wait(), timeout=timeout)
            except TimeoutError:
                pass
            self._wake.clear()
            await self.flush()

    async def flush(self) -> None:
        if not self._counts:
            return
        counts, self._counts = self._counts, Counter()
        reports: list[tuple[str, UsageReport]] = []
        if self._flush_seconds == 0:
            # One signal per request, as configured (an audit trail in the workflow's history).
            for (model, org), n in counts.items():
                reports += [(model, UsageReport(1, {org: 1})) for _ in range(n)]
        else:
            by_model: dict[str, UsageReport] = {}
            for (model, org), n in counts.items():
                report = by_model.setdefault(model, UsageReport(0, {}))
                report.count += n
                report.by_organization[org] = n
            reports = list(by_model.items())
        results = await asyncio.gather(*(self._send(m, r) for m, r in reports), return_exceptions=True)
        for (model, report), result in zip(reports, results, strict=True):
            if isinstance(result, BaseException):
                log.warning("usage of %s (%d requests) not sent, kept for later: %s", model, report.count, result)
                for org, n in report.by_organization.items():
                    self._counts[(model, org)] += n

    async def _send(self, model: str, report: UsageReport) -> None:
        handle = self._client.get_workflow_handle(workflow_id(model))
        try:
            await handle.signal(ModelLifecycleWorkflow.record_usage, report)
            self.signals_sent += 1
        except RPCError as exc:
            if exc.status != RPCStatusCode.NOT_FOUND:
                raise
            # The model was removed meanwhile; there is no one left to tell.
            log.debug("usage of removed model %s dropped", model)
