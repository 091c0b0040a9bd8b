"""Reading the settings: `modelium.yaml`, then `MODELIUM_*` environment variables, then the command
line's overrides, checked against the schema (`modelium.config.sections`) with errors that name
the key and where it came from."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from modelium.config.sections import Settings

ENV_PREFIX = "MODELIUM_"
# Environment variables with the prefix that are not configuration keys.
# (MODELIUM_API_KEY and MODELIUM_URL are what the management CLI sends and where.)
_ENV_NOT_KEYS = {"MODELIUM_CONFIG", "MODELIUM_API_KEY", "MODELIUM_URL"}
DEFAULT_CONFIG_FILE = "modelium.yaml"


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the key and the source."""


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or name in _ENV_NOT_KEYS:
            continue
        path = [part.lower() for part in name[len(ENV_PREFIX) :].split("__")]
        if not all(path):
            raise ConfigError(f"environment variable {name}: empty key segment")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"environment variable {name}: not a valid value: {exc}") from exc
        node = tree
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"environment variable {name}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return tree


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def _format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for err in exc.errors():
        key = ".".join(str(part) for part in err["loc"]) or "(root)"
        if err["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
            continue
        got = err.get("input")
        shown = "" if isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  {key}: {err['msg']}{shown}")
    return "\n".join(lines)


def load_settings(
    path: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Read the config file (if any), apply environment variables, then explicit overrides.

    `path` None means: `$MODELIUM_CONFIG`, else `./modelium.yaml` when it exists, else defaults.
    A file that was asked for explicitly must exist.
    """
    env = os.environ if environ is None else environ
    explicit = path is not None or "MODELIUM_CONFIG" in env
    chosen = Path(path if path is not None else env.get("MODELIUM_CONFIG", DEFAULT_CONFIG_FILE))
    data: dict[str, Any] = {}
    sources = []
    if chosen.is_file():
        try:
            loaded = yaml.safe_load(chosen.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{chosen}: not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{chosen}: the top level must be a mapping of keys")
        data = loaded or {}
        sources.append(str(chosen))
    elif explicit:
        raise ConfigError(f"config file {chosen} does not exist")
    env_tree = _env_overrides(env)
    if env_tree:
        sources.append("MODELIUM_* environment")
        data = _merge(data, env_tree)
    if overrides:
        sources.append("command line")
        data = _merge(data, overrides)
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, ", ".join(sources) or "defaults")) from None
