"""Turns folder events into workflow starts and signals."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import replace
from pathlib import Path

from temporalio.client import Client
from temporalio.common import SearchAttributePair, TypedSearchAttributes
from temporalio.service import RPCError, RPCStatusCode

from modelium.config import Settings
from modelium.names import workflow_id
from modelium.runtimes import BESIDE_RUNTIMES, VLLM, load_timeouts
from modelium.types import ModelSource, Phase
from modelium.watcher import ModelFolderWatcher
from workflows.contracts import (
    MODEL_KEY,
    PHASE_KEY,
    LifecycleInput,
    RemoveCommand,
    listed_state,
    running_models_query,
)
from workflows.lifecycle import ModelLifecycleWorkflow

log = logging.getLogger(__name__)

FILES_CHANGED_SIGNAL = ModelLifecycleWorkflow.files_changed.__name__


class WorkflowBridge:
    def __init__(self, client: Client, settings: Settings) -> None:
        self._client = client
        self._settings = settings
        self._task_queue = settings.temporal.control_task_queue
        # Running models as listed when the watcher started: name -> (fingerprint, phase). A
        # folder found unchanged is not signalled again (a restart beside 10,000 models would
        # otherwise wake all of them).
        self._known: dict[str, tuple[str, str]] = {}

    async def learn_running(self) -> int:
        """Read every running model's fingerprint from the visibility store (one List call)."""
        async for execution in self._client.list_workflows(running_models_query()):
            state = await listed_state(execution)
            if state is not None and state.fingerprint:
                self._known[state.name] = (state.fingerprint, state.phase)
        return len(self._known)

    async def model_ready(self, source: ModelSource) -> None:
        """Start the model's workflow, or tell the running one that its files changed."""
        source = self._with_configured_settings(source)
        known = self._known.pop(source.name, None)
        if known is not None and known[0] == source.fingerprint and known[1] != Phase.FAILED:
            log.debug("model %s is unchanged since its workflow last read it", source.name)
            return
        await self._client.start_workflow(
            ModelLifecycleWorkflow.run,
            LifecycleInput(
                source=source,
                idle_seconds=self._settings.idle_seconds,
                load_timeout_seconds=self._settings.runtimes.embedded.load_timeout_seconds,
                load_timeouts=load_timeouts(self._settings),
                max_restarts=self._settings.orchestration.policies.max_restarts,
                restart_backoff_seconds=self._settings.orchestration.policies.restart_backoff_seconds,
                preload=self._settings.orchestration.preload,
                update_strategy=self._settings.orchestration.updates.strategy,
                drain_seconds=self._settings.orchestration.updates.drain_seconds,
                beside_runtimes=sorted(BESIDE_RUNTIMES),
                park_runtimes=[VLLM] if self._settings.vllm.park == "sleep" else [],
            ),
            id=workflow_id(source.name),
            task_queue=self._task_queue,
            search_attributes=TypedSearchAttributes(
                [
                    SearchAttributePair(MODEL_KEY, source.name),
                    SearchAttributePair(PHASE_KEY, Phase.DISCOVERED),
                ]
            ),
            start_signal=FILES_CHANGED_SIGNAL,
            start_signal_args=[source],
        )
        log.info("model %s handed to workflow %s", source.name, workflow_id(source.name))

    def _with_configured_settings(self, source: ModelSource) -> ModelSource:
        """`models.<name>` in the configuration counts as part of the model's files: changed and
        followed by a restart, the fingerprint differs and the workflow reads the model again,
        applying it (a model without such an entry keeps its folder's fingerprint)."""
        configured = self._settings.models.get(source.name)
        if configured is None:
            return source
        digest = hashlib.sha256(configured.model_dump_json(exclude_unset=True).encode()).hexdigest()[:12]
        return replace(source, fingerprint=f"{source.fingerprint}+config-{digest}")

    async def model_removed(self, name: str) -> None:
        handle = self._client.get_workflow_handle(workflow_id(name))
        try:
            await handle.signal(ModelLifecycleWorkflow.remove, RemoveCommand())
        except RPCError as exc:
            if exc.status != RPCStatusCode.NOT_FOUND:
                raise
            log.info("model %s removed; its workflow had already ended", name)

    async def remove_vanished(self, watcher: ModelFolderWatcher) -> int:
        """After a restart: end the workflows of models whose directories are gone."""
        present = watcher.present_models()
        roots = watcher.directories
        removed = 0
        async for execution in self._client.list_workflows(running_models_query()):
            state = await listed_state(execution)
            if state is None:
                continue
            if not state.path:
                # Started before summaries were kept in the memo: ask the workflow itself.
                state = await self._client.get_workflow_handle(execution.id).query(ModelLifecycleWorkflow.state)
            path = Path(state.path)
            if state.name in present or path.exists():
                continue
            if not any(path.is_relative_to(root) for root in roots):
                continue  # another watcher's model
            await self.model_removed(state.name)
            removed += 1
        return removed


def folder_watcher(settings: Settings, bridge: WorkflowBridge) -> ModelFolderWatcher:
    discovery = settings.orchestration.model_discovery
    return ModelFolderWatcher(
        settings.watch_directories,
        on_ready=bridge.model_ready,
        on_removed=bridge.model_removed,
        settle_seconds=discovery.settle_seconds,
        polling=discovery.polling,
        poll_interval=discovery.poll_interval_seconds,
    )
