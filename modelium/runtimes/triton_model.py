"""The Python-backend model Triton runs for a HuggingFace directory: a transformers pipeline that
takes a TEXT tensor of strings and answers an OUTPUT tensor of JSON results, one per input.

Triton loads this file as the entry's `1/model.py` (`triton.write_entry` copies it there behind
a prologue that puts Modelium's site-packages on the stub's path). It reads what to load from the
parameters in the entry's config.pbtxt: `model_dir`, `task` and `device_index` (-1 for CPU).

No `from __future__` import: the prologue comes first in the copy, where one would not be allowed.
"""

import json
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils


def _parameters(args: dict[str, str]) -> dict[str, str]:
    config = json.loads(args["model_config"])
    return {key: value["string_value"] for key, value in config.get("parameters", {}).items()}


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        from transformers import pipeline

        params = _parameters(args)
        build: Any = pipeline  # the task is known only at run time, beyond its typed overloads
        self.pipe = build(params["task"], model=params["model_dir"], device=int(params["device_index"]))

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            raw = pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy().reshape(-1)
            texts = [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in raw]
            results = self.pipe(texts)
            if hasattr(results, "tolist"):
                results = results.tolist()
            out = np.array([json.dumps(r) for r in results], dtype=object)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT", out)]))
        return responses
