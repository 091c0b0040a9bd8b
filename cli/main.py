"""The `modelium` command: one subcommand per role (`serve`, `gateway`, `watch`, `worker ...`)
and the operator's tools (`models`, `load`, `unload`, `rollback`, `keys`, `check`, `config`, `demo-model`).

The composition roots (`workers/`) and heavy libraries are imported inside the commands that need
them, so that `modelium keys create` or `modelium models` start in a fraction of a second.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import Any

from modelium.config import ConfigError, Settings, load_settings

log = logging.getLogger("modelium")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if getattr(args, "node_id", None):
        out.setdefault("node", {})["id"] = args.node_id
    if getattr(args, "port", None) is not None:
        out.setdefault("gateway", {})["port"] = args.port
    if getattr(args, "host", None):
        out.setdefault("gateway", {})["host"] = args.host
    if getattr(args, "watch", None):
        discovery = out.setdefault("orchestration", {}).setdefault("model_discovery", {})
        discovery["watch_directories"] = args.watch
    if getattr(args, "temporal_address", None):
        out.setdefault("temporal", {})["address"] = args.temporal_address
    return out


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(args.config, overrides=_overrides(args))


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # Temporal's worker logs every poll failure at WARNING while the server starts; keep it quiet.
    logging.getLogger("temporalio").setLevel(max(logging.getLevelName(level), logging.WARNING))
    # One line per proxied request is noise at INFO.
    logging.getLogger("httpx").setLevel(max(logging.getLevelName(level), logging.WARNING))


def _run_parts(
    settings: Settings, *, gateway: bool = True, control: bool = True, node: bool = True, watch: bool = True
) -> int:
    parts = {"gateway": gateway, "control": control, "node": node, "watch": watch}
    from workers.serve import Running, install_stop_signals, serve

    async def main() -> None:
        stop = asyncio.Event()
        install_stop_signals(stop)

        def announce(running: Running) -> None:
            lines = []
            if parts.get("control", True):
                lines.append(f"control     task queue {settings.temporal.control_task_queue}")
            if running.node is not None:
                from modelium.names import node_task_queue

                lines.append(f"node agent  {running.node.node_id} (task queue {node_task_queue(running.node.node_id)})")
            if running.gateway_port:
                host = settings.gateway.host
                lines.append(f"gateway     http://{host}:{running.gateway_port}")
            if running.temporal is not None and settings.temporal.ui:
                lines.append(f"temporal ui http://127.0.0.1:{settings.temporal.ui_port}")
            if running.metrics_port:
                lines.append(f"metrics     http://{settings.metrics.host}:{running.metrics_port}/metrics")
            if parts.get("watch", True):
                dirs = ", ".join(str(d) for d in settings.watch_directories)
                lines.append(f"watching    {dirs}")
            print("Modelium is running (Ctrl-C stops it):\n  " + "\n  ".join(lines), flush=True)

        await serve(settings, stop, on_ready=announce, gateway=gateway, control=control, node=node, watch=watch)

    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(main())
    return 0


def _loop_factory() -> Any:
    """uvloop when installed (it comes with uvicorn[standard]): the gateway proxies every request,
    and uvloop's event loop costs a fraction of asyncio's per I/O event."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def cmd_serve(args: argparse.Namespace) -> int:
    return _run_parts(_settings(args))


def cmd_worker(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if args.kind == "control":
        return _run_parts(settings, gateway=False, node=False, watch=False)
    return _run_parts(settings, gateway=False, control=False, watch=False)


def cmd_gateway(args: argparse.Namespace) -> int:
    return _run_parts(_settings(args), control=False, node=False, watch=False)


def cmd_watch(args: argparse.Namespace) -> int:
    return _run_parts(_settings(args), gateway=False, control=False, node=False)


def cmd_demo_model(args: argparse.Namespace) -> int:
    from cli.demo import write_demo_model

    path = write_demo_model(args.directory, task=args.task)
    print(f"wrote a tiny {args.task} model to {path}")
    return 0


def cmd_manage(args: argparse.Namespace) -> int:
    from cli import manage

    return manage.main(args.command, _settings(args), args)


def cmd_keys(args: argparse.Namespace) -> int:
    from modelium.keys import digest, new_key

    key = new_key()
    entry = {
        "name": args.name,
        "organization": args.org,
        "sha256": digest(key),
        "scopes": ["admin"] if args.admin else [],
    }
    from pydantic import ValidationError

    from modelium.config import ApiKey

    try:
        ApiKey.model_validate(entry)  # a bad --org or --name fails here, not at the next start
    except ValidationError as exc:
        problems = "; ".join(
            f"--{'org' if e['loc'][0] == 'organization' else e['loc'][0]}: {e['msg']}" for e in exc.errors()
        )
        print(f"modelium keys create: {problems}", file=sys.stderr)
        return 2
    print(f"API key (shown once; the config keeps only its digest):\n  {key}\n")
    print("Add this to modelium.yaml under gateway.api_keys:")
    print(
        f"  - name: {entry['name']}\n    organization: {entry['organization']}\n"
        f"    sha256: {entry['sha256']}\n    scopes: {json.dumps(entry['scopes'])}"
    )
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from cli.check import report, run_checks

    checks = run_checks(_settings(args))
    print(report(checks, args.verbose))
    failed = [c.name for c in checks if not c.ok]
    print(f"\n{len(failed)} problem(s): {', '.join(failed)}" if failed else "\nall enabled parts are ready")
    return 1 if failed else 0


def cmd_config(args: argparse.Namespace) -> int:
    print(json.dumps(_settings(args).model_dump(mode="json"), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modelium",
        description="Drop a model folder into a watched directory; Modelium serves it.",
    )
    parser.add_argument(
        "--config", type=Path, default=None, help="modelium.yaml to read (default: $MODELIUM_CONFIG or ./modelium.yaml)"
    )
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING, ERROR")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run everything on this machine with one command")
    serve.add_argument("--port", type=int, help="gateway port (gateway.port)")
    serve.add_argument("--host", help="gateway bind address (gateway.host)")
    serve.add_argument(
        "--watch", action="append", type=Path, metavar="DIR", help="watch this directory for models (repeatable)"
    )
    serve.add_argument("--node-id", help="this machine's node id (node.id)")
    serve.add_argument("--temporal-address", help="use this Temporal cluster, not an embedded one")
    serve.set_defaults(func=cmd_serve)

    worker = sub.add_parser("worker", help="run one worker: the control worker or a node agent")
    worker.add_argument("kind", choices=["control", "node"])
    worker.add_argument("--node-id", help="this machine's node id (node.id)")
    worker.add_argument("--temporal-address")
    worker.set_defaults(func=cmd_worker)

    gateway = sub.add_parser("gateway", help="run the HTTP gateway alone")
    gateway.add_argument("--port", type=int)
    gateway.add_argument("--host")
    gateway.add_argument("--temporal-address")
    gateway.set_defaults(func=cmd_gateway)

    watch = sub.add_parser("watch", help="run the folder watcher alone")
    watch.add_argument("--watch", action="append", type=Path, metavar="DIR")
    watch.add_argument("--temporal-address")
    watch.set_defaults(func=cmd_watch)

    demo = sub.add_parser("demo-model", help="write a tiny model (random weights, no download)")
    demo.add_argument("directory", type=Path)
    demo.add_argument(
        "--task", default="text-generation", choices=["text-generation", "text-classification", "feature-extraction"]
    )
    demo.set_defaults(func=cmd_demo_model)

    def client_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--url", help="the gateway (default: $MODELIUM_URL, else gateway.host:gateway.port)")
        p.add_argument("--api-key", help="API key (default: $MODELIUM_API_KEY)")
        p.add_argument("--http-timeout", type=float, default=660.0, help=argparse.SUPPRESS)
        p.set_defaults(func=cmd_manage)

    models = sub.add_parser("models", help="list models: phase, runtime, node, memory, last use, requests")
    models.add_argument("--json", action="store_true", help="print the gateway's JSON")
    client_options(models)

    load = sub.add_parser("load", help="load a model now (optionally pinned, or with its own idle timeout)")
    load.add_argument("name")
    load.add_argument(
        "--pin",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="--pin: never unload for being idle; --no-pin: undo that",
    )
    load.add_argument("--idle-timeout", type=float, metavar="SECONDS", help="this model's idle timeout")
    load.add_argument("--no-wait", action="store_true", help="return at once; do not wait until it serves")
    load.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="how long to wait (default: gateway.cold_start_timeout_seconds)",
    )
    client_options(load)

    unload = sub.add_parser("unload", help="unload a model (it stays known; a request loads it again)")
    unload.add_argument("name")
    unload.add_argument("--no-wait", action="store_true")
    client_options(unload)

    rollback = sub.add_parser(
        "rollback", help="serve a model's previous version again (numbered version folders, or a symlink to releases)"
    )
    rollback.add_argument("name")
    client_options(rollback)

    keys = sub.add_parser("keys", help="API keys for the gateway")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="make a key; prints it once and its config entry")
    create.add_argument("--org", required=True, help="the organization requests with this key count for")
    create.add_argument("--name", required=True, help="a label for the key (who or what uses it)")
    create.add_argument("--admin", action="store_true", help="may load and unload models")
    create.set_defaults(func=cmd_keys)

    check = sub.add_parser("check", help="is every enabled part installed and reachable? (runtimes, GPUs, Temporal)")
    check.add_argument("--verbose", "-v", action="store_true", help="show versions, paths and devices")
    check.set_defaults(func=cmd_check)

    config = sub.add_parser("config", help="print the effective configuration")
    config.set_defaults(func=cmd_config)
    _global_options_everywhere(parser)
    return parser


def _global_options_everywhere(parser: argparse.ArgumentParser) -> None:
    """Accept --config and --log-level after the subcommand too (`modelium serve --config x.yaml`),
    as users type them; given there, they win over the same option before it."""
    for action in parser._subparsers._group_actions if parser._subparsers else []:
        for child in getattr(action, "choices", {}).values():
            child.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="as before the subcommand")
            child.add_argument("--log-level", default=argparse.SUPPRESS, help="as before the subcommand")
            _global_options_everywhere(child)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings_level = args.log_level or _settings(args).log_level
    except ConfigError as exc:
        print(f"modelium: {exc}", file=sys.stderr)
        return 2
    _setup_logging(settings_level.upper())
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"modelium: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from workers.temporal_server import TemporalStartError

        if isinstance(exc, TemporalStartError | OSError):
            print(f"modelium: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
