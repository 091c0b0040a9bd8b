"""`ModeliumRuntimeLog`: reads the end of a model's runtime log on the node that runs it.

The gateway cannot read a file on another machine; the node agent can, through an activity on its
own task queue. This short workflow (one activity, seconds) is how a gateway asks for it, so the
log reaches it through Temporal, with Temporal's authentication, from any node.
"""

from __future__ import annotations

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from workflows import steps

RUNTIME_LOG_WORKFLOW_TYPE = "ModeliumRuntimeLog"


@workflow.defn(name=RUNTIME_LOG_WORKFLOW_TYPE)
class RuntimeLogWorkflow:
    @workflow.run
    async def run(self, request: steps.LogRequest) -> steps.LogTail:
        return await steps.read_runtime_log(request)
