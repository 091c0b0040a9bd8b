"""The optional LLM brain: an OpenAI-compatible chat endpoint proposes where a model runs.

Its answer is only a proposal. It must name a runtime that is enabled on the node, can serve this
model there (the same rules that would pick it), devices of a live node, and room on each of them.
Anything else (no answer in time, not JSON, something unavailable) is reported in words, and the
rules' decision stands.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Collection, Sequence
from typing import Any

import httpx

from modelium import memory
from modelium.brain import NoRuntimeAvailable, choose_runtime
from modelium.config import LlmBrain
from modelium.runtimes import TENSOR_PARALLEL
from modelium.types import Decision, DecisionSource, ModelAnalysis, NodeInventory

SYSTEM_PROMPT = (
    "You place machine-learning models on the devices of a small cluster for Modelium. "
    "Given a model's analysis and the nodes with their devices, free memory and runtimes, choose "
    "where the model runs. Answer with one JSON object and nothing else: "
    '{"runtime": "<runtime>", "node": "<node id>", "devices": ["<device>", ...], "reason": "<one sentence>"}. '
    f"Use several devices only for tensor parallel on {' or '.join(sorted(TENSOR_PARALLEL))}."
)


class LlmAnswerRejected(ValueError):
    """The LLM's answer cannot be used; the message says why."""


def prompt(analysis: ModelAnalysis, runtimes: Collection[str], nodes: Sequence[NodeInventory]) -> str:
    facts: dict[str, Any] = {
        "model": {
            "name": analysis.name,
            "format": analysis.format,
            "architecture": analysis.architecture,
            "task": analysis.task,
            "modality": analysis.modality,
            "parameters": analysis.parameter_count,
            "quantization": analysis.quantization,
            "context_length": analysis.context_length,
            "memory_needed_bytes_by_runtime": analysis.memory_estimates,
        },
        "enabled_runtimes": sorted(runtimes),
        "nodes": [
            {
                "node": n.node,
                "runtimes": sorted(set(n.runtimes) & set(runtimes)),
                "devices": [
                    {
                        "device": d.device,
                        "name": d.name,
                        "free_bytes": d.total_bytes - d.booked_bytes,
                        "total_bytes": d.total_bytes,
                    }
                    for d in n.devices
                ],
            }
            for n in nodes
        ],
    }
    return json.dumps(facts, indent=1)


async def ask(
    config: LlmBrain,
    analysis: ModelAnalysis,
    runtimes: Collection[str],
    nodes: Sequence[NodeInventory],
    environ: dict[str, str] | None = None,
) -> Decision:
    """The LLM's decision, validated. Raises LlmAnswerRejected with the reason otherwise."""
    env = os.environ if environ is None else environ
    headers = {}
    if config.api_key_env:
        key = env.get(config.api_key_env)
        if not key:
            raise LlmAnswerRejected(f"brain.llm.api_key_env names {config.api_key_env}, which is not set")
        headers["Authorization"] = f"Bearer {key}"
    body = {
        "model": config.model,
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": prompt(analysis, runtimes, nodes)},
        ],
        "temperature": 0,
        "max_tokens": 256,
    }
    url = f"{(config.base_url or '').rstrip('/')}/chat/completions"
    try:
        async with httpx.AsyncClient(timeout=config.timeout_seconds) as client:
            response = await client.post(url, json=body, headers=headers)
    except httpx.TimeoutException:
        raise LlmAnswerRejected(f"{url} did not answer within {config.timeout_seconds:g}s") from None
    except httpx.HTTPError as exc:
        raise LlmAnswerRejected(f"{url} could not be reached: {exc}") from None
    if response.status_code != 200:
        raise LlmAnswerRejected(f"{url} answered {response.status_code}: {response.text[:200]}")
    try:
        content = response.json()["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise LlmAnswerRejected(f"{url} did not answer in the chat completion format") from None
    return validate(parse(str(content)), analysis, runtimes, nodes)


def parse(content: str) -> dict[str, Any]:
    """The JSON object in the answer (models often wrap it in a code fence or a sentence)."""
    match = re.search(r"\{.*\}", content, re.DOTALL)
    if match is None:
        raise LlmAnswerRejected(f"the answer holds no JSON object: {content[:120]!r}")
    try:
        data = json.loads(match.group(0))
    except json.JSONDecodeError as exc:
        raise LlmAnswerRejected(f"the answer is not valid JSON ({exc.msg}): {content[:120]!r}") from None
    if not isinstance(data, dict):
        raise LlmAnswerRejected("the answer is not a JSON object")
    return data


def validate(
    answer: dict[str, Any], analysis: ModelAnalysis, runtimes: Collection[str], nodes: Sequence[NodeInventory]
) -> Decision:
    runtime, node_id, devices = answer.get("runtime"), answer.get("node"), answer.get("devices")
    if isinstance(devices, str):
        devices = [devices]
    if not isinstance(runtime, str) or not isinstance(node_id, str) or not isinstance(devices, list) or not devices:
        raise LlmAnswerRejected(f"the answer lacks runtime, node or devices: {json.dumps(answer)[:200]}")
    node = next((n for n in nodes if n.node == node_id), None)
    if node is None:
        raise LlmAnswerRejected(f"node {node_id!r} is not a live node ({', '.join(n.node for n in nodes)})")
    available = set(runtimes) & set(node.runtimes)
    if runtime not in available:
        raise LlmAnswerRejected(f"runtime {runtime!r} is not enabled on {node_id} ({', '.join(sorted(available))})")
    by_name = {d.device: d for d in node.devices}
    unknown = [d for d in devices if d not in by_name]
    if unknown:
        raise LlmAnswerRejected(f"{node_id} has no device {', '.join(map(str, unknown))}")
    on_gpu = all(str(d).startswith("cuda") for d in devices)
    try:
        ruled, _ = choose_runtime(analysis, {runtime}, on_gpu)
    except NoRuntimeAvailable as exc:
        raise LlmAnswerRejected(f"{runtime} cannot serve this model there: {exc}") from None
    if ruled != runtime:
        raise LlmAnswerRejected(f"{runtime} cannot serve a {analysis.task} model")
    if len(devices) > 1 and (runtime not in TENSOR_PARALLEL or not on_gpu):
        raise LlmAnswerRejected(
            f"only {', '.join(sorted(TENSOR_PARALLEL))} splits a model over several GPUs, not {runtime}"
        )
    need = analysis.memory_estimates.get(runtime, analysis.memory_estimate_bytes)
    need = memory.per_shard(need, runtime, len(devices)) if len(devices) > 1 else need
    for name in devices:
        dev = by_name[name]
        if need > dev.total_bytes - dev.booked_bytes:
            raise LlmAnswerRejected(
                f"{node_id}/{name} has {(dev.total_bytes - dev.booked_bytes) / 2**20:.0f} MiB free, "
                f"the model needs {need / 2**20:.0f} MiB there"
            )
    reason = str(answer.get("reason") or "no reason given")[:300]
    return Decision(
        runtime,
        node_id,
        devices[0],
        f"LLM brain: {reason}",
        source=DecisionSource.LLM,
        memory_bytes=need,
        devices=list(devices) if len(devices) > 1 else [],
    )
