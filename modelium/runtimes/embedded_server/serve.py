"""`python -m modelium.runtimes.embedded_server --model-dir DIR --name NAME --task TASK --port N`:
the model is loaded before the port is bound, so `/health` answering means ready.

`... --spare --port N` starts a warm spare instead (`spare.py`): imports done, no model yet."""

from __future__ import annotations

import argparse
import logging

import torch
import uvicorn

from modelium.runtimes.embedded_server.engine import TASKS, Engine, load
from modelium.runtimes.embedded_server.http import Routes
from modelium.runtimes.embedded_server.spare import serve_spare


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--spare", action="store_true", help="wait, imports done, for POST /take")
    parser.add_argument("--pool", help="a spare's node directory (shown by ps; not read)")
    parser.add_argument("--model-dir")
    parser.add_argument("--name")
    parser.add_argument("--task", choices=TASKS)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if args.spare:
        serve_spare(args.host, args.port)
        return
    if not (args.model_dir and args.name and args.task):
        parser.error("--model-dir, --name and --task are required (or --spare)")
    if args.threads:
        torch.set_num_threads(args.threads)
    routes = Routes(Engine(load(args.model_dir, args.name, args.task, args.device)))
    uvicorn.run(routes.app(), host=args.host, port=args.port, log_level="warning", access_log=False)
