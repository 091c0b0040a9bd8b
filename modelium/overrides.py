"""Per-model overrides: `models.<name>` in the main config, or a `modelium.yaml` beside the model.

The file travels with the model (whoever drops it says how it should run); the main config is the
operator's and wins where both set a key.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import yaml
from pydantic import ValidationError

from modelium.analyzer.common import ModelDirectoryError
from modelium.config import ModelSettings, SmokeRequest
from modelium.types import ModelOverrides

MODEL_SETTINGS_FILE = "modelium.yaml"


def read_overrides(model_path: str | Path, name: str, configured: Mapping[str, ModelSettings]) -> ModelOverrides:
    """The model's overrides. Raises ModelDirectoryError naming the file and key when the file
    beside the model is not valid."""
    values: dict[str, object] = {}
    sources: list[str] = []
    path = Path(model_path) / MODEL_SETTINGS_FILE
    if path.is_file():
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ModelDirectoryError(f"{path}: not valid YAML: {exc}") from None
        if raw is not None and not isinstance(raw, dict):
            raise ModelDirectoryError(f"{path}: the top level must be a mapping of keys")
        try:
            from_file = ModelSettings.model_validate(raw or {})
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: "
                f"{'unknown key' if e['type'] == 'extra_forbidden' else e['msg']}"
                for e in exc.errors()
            )
            raise ModelDirectoryError(f"{path}: {problems}") from None
        values.update(from_file.model_dump(exclude_unset=True))
        sources.append(str(path))
    if name in configured:
        values.update(configured[name].model_dump(exclude_unset=True))
        sources.append(f"models.{name} in the configuration")
    settings = ModelSettings.model_validate(values)
    return ModelOverrides(
        runtime=settings.runtime,
        pin=settings.pin,
        idle_timeout_seconds=settings.idle_timeout_seconds,
        node=settings.node,
        devices=list(settings.devices),
        smoke=settings.smoke if isinstance(settings.smoke, bool) else None,
        smoke_path=settings.smoke.path if isinstance(settings.smoke, SmokeRequest) else None,
        smoke_body=dict(settings.smoke.body) if isinstance(settings.smoke, SmokeRequest) else None,
        smoke_status=settings.smoke.status if isinstance(settings.smoke, SmokeRequest) else 200,
        source=" and ".join(sources),
    )
