"""Reads a model directory and says what it is, without loading its weights.

Only metadata is read: config.json, safetensors headers (their first few KB), the tokenizer files'
presence, a GGUF or ONNX header, a Triton entry's config.pbtxt. A directory that cannot be served
raises `ModelDirectoryError` with a reason a user can act on. One module per format:
`huggingface`, `gguf`, `onnx`, `triton`; `common` holds what they share.
"""

from __future__ import annotations

from pathlib import Path

from modelium.analyzer.common import ModelDirectoryError
from modelium.analyzer.gguf import analyze_gguf
from modelium.analyzer.huggingface import analyze_huggingface, warm_up
from modelium.analyzer.onnx import analyze_onnx
from modelium.analyzer.triton import analyze_triton
from modelium.types import ModelAnalysis

__all__ = ["DEFAULT_MAX_CONTEXT_TOKENS", "PARTIAL_SUFFIXES", "ModelDirectoryError", "analyze_directory", "warm_up"]

# What the gateway lets one request use: the KV cache is sized for at most this many tokens.
DEFAULT_MAX_CONTEXT_TOKENS = 4096
# Files that mean a copy or download is still in progress.
PARTIAL_SUFFIXES = (".part", ".partial", ".tmp", ".incomplete", ".crdownload", ".lock")


def numbered_versions(directory: Path) -> list[int]:
    """The numbered version folders (`1/`, `2/`, ...) of a model folder that holds no model of its
    own at its top (a Triton entry's numbered folders belong to its config.pbtxt)."""
    if (directory / "config.json").is_file() or (directory / "config.pbtxt").is_file():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())


def analyze_directory(
    path: str | Path,
    name: str,
    *,
    max_context_tokens: int = DEFAULT_MAX_CONTEXT_TOKENS,
    version: str | None = None,
) -> ModelAnalysis:
    """What the directory holds: a HuggingFace checkout, a Triton repository entry, a GGUF file or
    an ONNX model; or numbered versions of one (`my-model/1/`, `my-model/2/`), of which the
    highest complete one is analyzed (or `version`). The analysis's `path` is the folder to load
    (a symlink resolved). An unknown layout is reported, not guessed."""
    directory = Path(path)
    if not directory.is_dir():
        raise ModelDirectoryError(f"{directory} is not a directory (or it was removed)")
    versions = numbered_versions(directory)
    if versions or version is not None:
        return _analyze_versions(directory, name, versions, version, max_context_tokens)
    partial = [p.name for p in directory.rglob("*") if p.name.endswith(PARTIAL_SUFFIXES)]
    if partial:
        raise ModelDirectoryError(f"a copy is still in progress: {', '.join(partial[:5])}")
    if (directory / "config.pbtxt").is_file():
        return analyze_triton(directory, name)
    if not (directory / "config.json").is_file():
        ggufs = sorted(directory.glob("*.gguf"))
        if ggufs:
            return analyze_gguf(directory, name, ggufs, max_context_tokens)
        onnx = sorted(directory.glob("*.onnx")) or sorted(directory.glob("onnx/*.onnx"))
        if onnx:
            return analyze_onnx(directory, name, onnx)
        raise ModelDirectoryError(
            "no config.json: this is not a HuggingFace model directory, and it holds no *.gguf, "
            "*.onnx or Triton config.pbtxt either"
        )
    return analyze_huggingface(directory, name, max_context_tokens)


def _analyze_versions(
    directory: Path, name: str, versions: list[int], wanted: str | None, max_context_tokens: int
) -> ModelAnalysis:
    """The highest version that analyzes (a higher one still being copied, or broken, is skipped
    and said so), or the `wanted` one."""
    if wanted is not None:
        if not (directory / wanted).is_dir():
            raise ModelDirectoryError(f"version {wanted} no longer exists (versions: {_listed(versions)})")
        tried = [int(wanted)] if wanted.isdigit() else []
        order = [wanted]
    else:
        tried = versions
        order = [str(v) for v in reversed(versions)]
    skipped: list[str] = []
    for label in order:
        try:
            analysis = analyze_directory(directory / label, name, max_context_tokens=max_context_tokens)
        except ModelDirectoryError as exc:
            skipped.append(f"{label}: {exc}")
            if wanted is not None:
                raise ModelDirectoryError(f"version {label}: {exc}") from None
            continue
        analysis.details["version"] = label
        analysis.details["versions"] = _listed(versions or tried)
        if skipped:
            analysis.details["skipped versions"] = "; ".join(skipped)
        return analysis
    raise ModelDirectoryError(f"no complete version among {_listed(versions)}: {'; '.join(skipped)}")


def _listed(versions: list[int]) -> str:
    return ", ".join(str(v) for v in versions) or "none"
