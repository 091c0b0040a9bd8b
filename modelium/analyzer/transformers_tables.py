"""Prints transformers' architecture tables as JSON: architecture class name -> task, and the
known model types, from transformers' own auto mappings.

Run as `python -m modelium.analyzer.transformers_tables`, in a child process: importing the
mappings pulls in torch (seconds), which the analyzing process should neither wait for nor hold
its GIL for (`huggingface._tables` caches the answer per transformers version).
"""

from __future__ import annotations

import json
from typing import Any

from modelium.types import Task

# Most specific first: an architecture listed under several tasks takes the first.
_TASK_MAPPINGS = (
    (Task.TEXT_GENERATION, "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    (Task.TEXT2TEXT_GENERATION, "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"),
    (Task.AUTOMATIC_SPEECH_RECOGNITION, "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES"),
    (Task.AUTOMATIC_SPEECH_RECOGNITION, "MODEL_FOR_CTC_MAPPING_NAMES"),
    (Task.AUDIO_CLASSIFICATION, "MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES"),
    (Task.IMAGE_TEXT_TO_TEXT, "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES"),
    (Task.ZERO_SHOT_IMAGE_CLASSIFICATION, "MODEL_FOR_ZERO_SHOT_IMAGE_CLASSIFICATION_MAPPING_NAMES"),
    (Task.IMAGE_CLASSIFICATION, "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES"),
    (Task.TEXT_CLASSIFICATION, "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
    (Task.TOKEN_CLASSIFICATION, "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"),
    (Task.FILL_MASK, "MODEL_FOR_MASKED_LM_MAPPING_NAMES"),
    (Task.FEATURE_EXTRACTION, "MODEL_MAPPING_NAMES"),
)


def tables_from_transformers() -> dict[str, Any]:
    """Architecture class name -> task, and the known model types, from transformers' own auto
    mappings. Importing them pulls in torch (seconds), so this runs in a child process."""
    from transformers.models.auto import modeling_auto as auto
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    known: dict[str, str] = {}
    for task, mapping_name in _TASK_MAPPINGS:
        for names in getattr(auto, mapping_name, {}).values():
            for name in names if isinstance(names, tuple | list) else (names,):
                known.setdefault(name, task)
    return {"architectures": known, "model_types": sorted(CONFIG_MAPPING_NAMES)}


if __name__ == "__main__":
    print(json.dumps(tables_from_transformers()))
