"""Stand-in for `vllm serve`, for tests on machines without a GPU (vLLM cannot run there).

It takes vLLM's command line as Modelium's vLLM adapter builds it, records the arguments and the
CUDA_VISIBLE_DEVICES it was given (JSON lines in $MODELIUM_STANDIN_RECORD), and then serves the
model with Modelium's embedded server on the CPU: the same OpenAI protocol vLLM speaks
(`/health`, `/v1/models`, `/v1/completions`, `/v1/chat/completions` with SSE streaming).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from modelium.runtimes.embedded_server import serve as embedded_server


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="vllm")
    parser.add_argument("command", choices=["serve"])
    parser.add_argument("model")
    parser.add_argument("--served-model-name", required=True)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tensor-parallel-size", type=int, required=True)
    parser.add_argument("--gpu-memory-utilization", type=float, required=True)
    args, extra = parser.parse_known_args(argv)
    record = os.environ.get("MODELIUM_STANDIN_RECORD")
    if record:
        with open(record, "a", encoding="utf-8") as fh:
            fh.write(
                json.dumps(
                    {
                        "argv": argv,
                        "extra": extra,
                        "pid": os.getpid(),
                        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                    }
                )
                + "\n"
            )
    embedded_server.main(
        [
            "--model-dir",
            args.model,
            "--name",
            args.served_model_name,
            "--task",
            "text-generation",
            "--host",
            args.host,
            "--port",
            str(args.port),
            "--device",
            "cpu",
            "--threads",
            "1",
        ]
    )


if __name__ == "__main__":
    main(sys.argv[1:])
