"""One small workflow per node agent: the node's last announced inventory, and whether it is
still there. Control workers read it to place models; the Temporal UI shows every node.

A node agent signals `announce` (with start) every few seconds and `leave` when it stops. Placement
judges liveness from `announced_at`. A node silent for `lost_after_seconds` is declared lost: the
models placed there are told (`node_lost`), so that none waits on the dead node's task queue, and
its bookings are written off in the inventory shown here until it announces again.
"""

from __future__ import annotations

import functools
from dataclasses import replace
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from modelium.types import NodeInventory, valid_seconds
    from workflows.contracts import (
        INVENTORY_MEMO,
        NODE_WORKFLOW_TYPE,
        ActivityName,
        LeaveRequest,
        NodeLost,
        NodeRegistryInput,
    )


@workflow.defn(name=NODE_WORKFLOW_TYPE)
class NodeRegistryWorkflow:
    @workflow.init
    def __init__(self, inp: NodeRegistryInput) -> None:
        self._inventory = inp.inventory
        self._left: str | None = None
        self._announcements = 0
        self._lost: str | None = None

    @workflow.query
    def inventory(self) -> NodeInventory:
        if self._lost is None:
            return self._inventory
        # Lost: nothing it booked holds any more (its models are placed elsewhere).
        inv = self._inventory
        devices = [replace(d, booked_bytes=0, used_bytes=None) for d in inv.devices]
        return replace(inv, devices=devices, lost=self._lost)

    @workflow.signal
    def announce(self, inventory: NodeInventory | None = None) -> None:
        # Optional payloads: a signal sent with no input (the Temporal UI) must not fail a task.
        if inventory is not None and inventory.node == self._inventory.node:
            self._inventory = inventory
            self._announcements += 1
            if self._lost is not None:
                workflow.logger.info("node %s is back", inventory.node)
                self._lost = None

    @workflow.signal
    def leave(self, request: LeaveRequest | None = None) -> None:
        self._left = (request or LeaveRequest()).reason or LeaveRequest().reason

    @workflow.run
    async def run(self, inp: NodeRegistryInput) -> None:
        lost_after = valid_seconds(inp.lost_after_seconds)
        # Histories from before the inventory was kept in the memo replay as they ran.
        memo = workflow.patched("inventory-memo")
        while not (self._left is not None or workflow.info().is_continue_as_new_suggested()):
            if memo:
                # Placement reads it from the visibility store: no query to this workflow, which
                # a control worker busy with thousands of registrations would answer late.
                workflow.upsert_memo({INVENTORY_MEMO: self.inventory()})
            try:
                await workflow.wait_condition(
                    functools.partial(self._woken, self._announcements),
                    timeout=timedelta(seconds=max(lost_after, 1.0)) if lost_after and self._lost is None else None,
                )
            except TimeoutError:
                await self._declare_lost(lost_after or 0.0)
        await workflow.wait_condition(workflow.all_handlers_finished)
        if self._left is not None:
            workflow.logger.info("node %s left: %s", self._inventory.node, self._left)
            return
        workflow.continue_as_new(NodeRegistryInput(self._inventory, inp.lost_after_seconds))

    def _woken(self, seen: int) -> bool:
        return self._announcements != seen or self._left is not None or workflow.info().is_continue_as_new_suggested()

    async def _declare_lost(self, silent: float) -> None:
        node = self._inventory.node
        self._lost = f"no announcement for {silent:g}s"
        workflow.logger.warning("node %s lost: %s; its models are placed again", node, self._lost)
        await workflow.execute_activity(
            ActivityName.NOTIFY_NODE_LOST,
            NodeLost(node, f"node {node} lost: {self._lost}"),
            start_to_close_timeout=timedelta(minutes=2),
            retry_policy=RetryPolicy(maximum_interval=timedelta(seconds=10)),
        )
