"""One small workflow per node agent: the node's last announced inventory, and whether it is
still there. Control workers read it to place models; the Temporal UI shows every node.

A node agent signals `announce` (with start) every few seconds and `leave` when it stops. The
workflow holds no timers: liveness is judged by the reader from `announced_at`.
"""

from __future__ import annotations

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from modelium.types import NodeInventory
    from workflows.contracts import NODE_WORKFLOW_TYPE, LeaveRequest, NodeRegistryInput


@workflow.defn(name=NODE_WORKFLOW_TYPE)
class NodeRegistryWorkflow:
    @workflow.init
    def __init__(self, inp: NodeRegistryInput) -> None:
        self._inventory = inp.inventory
        self._left: str | None = None

    @workflow.query
    def inventory(self) -> NodeInventory:
        return self._inventory

    @workflow.signal
    def announce(self, inventory: NodeInventory | None = None) -> None:
        # Optional payloads: a signal sent with no input (the Temporal UI) must not fail a task.
        if inventory is not None and inventory.node == self._inventory.node:
            self._inventory = inventory

    @workflow.signal
    def leave(self, request: LeaveRequest | None = None) -> None:
        self._left = (request or LeaveRequest()).reason or LeaveRequest().reason

    @workflow.run
    async def run(self, inp: NodeRegistryInput) -> None:
        await workflow.wait_condition(lambda: self._left is not None or workflow.info().is_continue_as_new_suggested())
        await workflow.wait_condition(workflow.all_handlers_finished)
        if self._left is not None:
            workflow.logger.info("node %s left: %s", self._inventory.node, self._left)
            return
        workflow.continue_as_new(NodeRegistryInput(self._inventory))
