"""One small workflow per node agent: the node's last announced inventory, and whether it is
still there. Control workers read it to place models; the Temporal UI shows every node.

A node agent signals `announce` (with start) every few seconds and `leave` when it stops. A node
silent for `lost_after_seconds` is declared lost: the models placed there are told (`node_lost`),
so that none waits on the dead node's task queue, and its bookings are written off in the
inventory shown here until it announces again. Placement reads the inventory from this
workflow's memo, which is written only when the inventory changes (its time aside): an
announcement that changes nothing costs one small workflow task and no visibility write, and one
liveness timer runs per `lost_after_seconds`, not one per announcement.
"""

from __future__ import annotations

import functools
from dataclasses import replace
from datetime import timedelta

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from modelium.types import NodeInventory, valid_seconds
    from workflows import steps
    from workflows.contracts import (
        INVENTORY_MEMO,
        NODE_WORKFLOW_TYPE,
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
        self._last_seen = workflow.time()

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
            self._last_seen = workflow.time()
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
        if memo and workflow.patched("quiet-announce"):
            await self._watch(lost_after or 0.0)
        while not self._ending():
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

    async def _watch(self, lost_after: float) -> None:
        """Until the node leaves or the history is long: write the memo when the inventory
        changed, and declare the node lost once nothing was announced for `lost_after`."""
        written: NodeInventory | None = None
        while not self._ending():
            current = self.inventory()
            if written is None or _differs(written, current):
                # Placement reads it from the visibility store: no query to this workflow, which
                # a control worker busy with thousands of registrations would answer late.
                workflow.upsert_memo({INVENTORY_MEMO: current})
                written = current
            timeout = None
            if lost_after and self._lost is None:
                timeout = timedelta(seconds=max(self._last_seen + lost_after - workflow.time(), 1.0))
            try:
                await workflow.wait_condition(functools.partial(self._should_write, written), timeout=timeout)
            except TimeoutError:
                silent = workflow.time() - self._last_seen
                if silent >= lost_after:
                    await self._declare_lost(silent, list_first=True)
                    written = None  # written again as it is now (lost, or back already)

    def _ending(self) -> bool:
        return self._left is not None or workflow.info().is_continue_as_new_suggested()

    def _should_write(self, written: NodeInventory) -> bool:
        return self._ending() or _differs(written, self.inventory())

    def _woken(self, seen: int) -> bool:
        return self._announcements != seen or self._ending()

    async def _declare_lost(self, silent: float, *, list_first: bool = False) -> None:
        """Mark the node lost and tell its models. `list_first`: the memo says so before they
        are told, so that their new placement does not read it as alive."""
        node = self._inventory.node
        self._lost = f"no announcement for {silent:.3g}s"
        workflow.logger.warning("node %s lost: %s; its models are placed again", node, self._lost)
        if list_first:
            workflow.upsert_memo({INVENTORY_MEMO: self.inventory()})
        await steps.notify_node_lost(NodeLost(node, f"node {node} lost: {self._lost}"))


def _differs(a: NodeInventory, b: NodeInventory) -> bool:
    """Whether two inventories differ in anything but when they were announced."""
    return replace(a, announced_at=0.0) != replace(b, announced_at=0.0)
