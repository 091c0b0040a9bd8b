"""One place that turns names into identifiers: model names, workflow ids, task queues.

Model names come from folder names a user chose, so they are sanitized before they become
workflow ids, paths, metric labels or URL segments.
"""

from __future__ import annotations

import hashlib
import re

CONTROL_TASK_QUEUE = "modelium-control"
WORKFLOW_ID_PREFIX = "modelium-model-"
MAX_MODEL_NAME = 63

_MODEL_ALLOWED = re.compile(r"[^a-z0-9._-]+")
_MODEL_VALID = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
_NODE_ALLOWED = re.compile(r"[^a-z0-9_-]+")


class InvalidModelName(ValueError):
    """A model name that cannot be used as given (empty, traversal, odd characters)."""


def sanitize_model_name(raw: str) -> str:
    """Map any folder name to a stable, safe model name.

    A name of lowercase letters, digits, '.', '_' and '-' passes through. Any other is cleaned
    (lowercased, other characters become '-') and a short hash of the original is appended, so
    that two different folders (`Foo` and `foo`) never share a name, whatever order they come in.
    """
    lowered = raw.strip().lower()
    cleaned = _MODEL_ALLOWED.sub("-", lowered).strip(".-_")
    cleaned = re.sub(r"-{2,}", "-", cleaned)
    if cleaned == raw and _MODEL_VALID.fullmatch(cleaned):
        return cleaned
    digest = hashlib.sha256(raw.encode("utf-8")).hexdigest()[:6]
    base = (cleaned or "model")[: MAX_MODEL_NAME - 7].rstrip(".-_") or "model"
    return f"{base}-{digest}"


def validate_model_name(name: str) -> str:
    """Check a name that arrives from a request path: it must already be a sanitized name."""
    # fullmatch: `$` would let a trailing newline through (`tiny-gpt2%0A`).
    if not _MODEL_VALID.fullmatch(name) or ".." in name:
        raise InvalidModelName(
            f"invalid model name {name!r}: use 1-63 lowercase letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


# A model's runtime instance on a node (its process, booking and log) is keyed by the model's name,
# or, for a second version loaded beside the serving one during an update, by the name, this
# mark and the update's number ("tiny-gpt2@u3"): never a model name, which has no '@'.
INSTANCE_MARK = "@u"


def instance_key(model: str, update: int | None = None) -> str:
    return model if not update else f"{model}{INSTANCE_MARK}{update}"


# The ledger's booking of host memory for a parked model's weights: its instance key and this.
PARKED_MARK = "~parked"


def parked_key(key: str) -> str:
    return key + PARKED_MARK


def model_of(key: str) -> str:
    """The model an instance key belongs to (the name the runtime serves it under)."""
    return key.split(INSTANCE_MARK, 1)[0]


def workflow_id(model: str) -> str:
    return WORKFLOW_ID_PREFIX + validate_model_name(model)


def model_from_workflow_id(wf_id: str) -> str | None:
    if not wf_id.startswith(WORKFLOW_ID_PREFIX):
        return None
    return wf_id[len(WORKFLOW_ID_PREFIX) :]


def sanitize_node_id(raw: str) -> str:
    cleaned = _NODE_ALLOWED.sub("-", raw.strip().lower()).strip("-_")
    return cleaned[:48] or "node"


def node_task_queue(node_id: str) -> str:
    return f"modelium-node-{sanitize_node_id(node_id)}"


NODE_WORKFLOW_ID_PREFIX = "modelium-node-"


def node_workflow_id(node_id: str) -> str:
    """The id of the workflow that holds a node agent's announced inventory."""
    return NODE_WORKFLOW_ID_PREFIX + sanitize_node_id(node_id)
