"""The embedded runtime's engine: one transformers model in memory, and what it does with a request
body (generate, stream token by token, classify, embed), with the parameters checked the way the
OpenAI API checks them. No HTTP here (`http.py` puts it behind routes)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    StoppingCriteria,
)
from transformers.generation.streamers import BaseStreamer

log = logging.getLogger("modelium.embedded_server")

TEXT_GENERATION = "text-generation"
TEXT_CLASSIFICATION = "text-classification"
FEATURE_EXTRACTION = "feature-extraction"
TASKS = (TEXT_GENERATION, TEXT_CLASSIFICATION, FEATURE_EXTRACTION)


class BadRequest(ValueError):
    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


# What torch.manual_seed takes.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
# Tokenizers without a real limit report this (or larger) as model_max_length.
_NO_LIMIT = 1_000_000


@dataclass
class Loaded:
    name: str
    task: str
    device: str
    tokenizer: Any
    model: Any
    created: int
    context_length: int | None
    # OpenAI's `system_fingerprint`: which version of the model answered (a hash of its config
    # and its weight files' names, sizes and times, as the watcher tells versions apart; the
    # weights are not read for it), so that clients can tell versions apart.
    fingerprint: str = ""


def files_fingerprint(model_dir: str) -> str:
    digest = hashlib.sha256()
    root = Path(model_dir)
    config = root / "config.json"
    if config.is_file():
        digest.update(config.read_bytes())
    for path in sorted(root.iterdir()):
        if path.is_file() and path.suffix in (".safetensors", ".bin", ".pt", ".gguf"):
            st = path.stat()
            digest.update(f"{path.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return "fp_" + digest.hexdigest()[:12]


# Architectures whose modelling code a warm spare imports ahead (the first costs ~0.2 s here,
# the code all of them share; each one more ~10 ms and no memory to speak of).
WARM_ARCHITECTURES = ("gpt2", "llama", "qwen2", "qwen3", "mistral", "gemma", "phi3", "bert")


def warm_imports() -> None:
    """Import what every load needs and transformers imports only on the first one: the modelling
    and generation machinery, and the common architectures' code (~1.5 s of a tiny model's first
    load here), so that a warm spare's load is the model's own work."""
    import importlib

    import transformers.generation.utils  # noqa: F401
    import transformers.masking_utils  # noqa: F401
    import transformers.modeling_utils  # noqa: F401
    from transformers.integrations import sdpa_attention  # noqa: F401

    for arch in WARM_ARCHITECTURES:
        try:
            importlib.import_module(f"transformers.models.{arch}.modeling_{arch}")
        except ImportError:  # not in this transformers release
            log.debug("no modelling code for %s to import", arch)


def write_rehearsal_model(directory: str) -> None:
    """A tiny GPT-2 (random weights) and word-level tokenizer, for a warm spare to load once."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    words = {"<unk>": 0, "hello": 1, "world": 2}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<unk>").save_pretrained(directory)
    config = GPT2Config(
        n_layer=1, n_embd=8, n_head=1, vocab_size=len(words), n_positions=8, bos_token_id=0, eos_token_id=0
    )
    GPT2LMHeadModel(config).save_pretrained(directory)


def load(model_dir: str, name: str, task: str, device: str) -> Loaded:
    log.info("loading %s (%s) from %s on %s", name, task, model_dir, device)
    started = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    cls = {
        TEXT_GENERATION: AutoModelForCausalLM,
        TEXT_CLASSIFICATION: AutoModelForSequenceClassification,
        FEATURE_EXTRACTION: AutoModel,
    }[task]
    # transformers builds the model on the meta device and fills it from the memory-mapped
    # safetensors in parallel threads (bench/cold_start.py: the ~1 GB model's weights at 57-168%
    # of one sequential read of its files). On a GPU, device_map puts each tensor straight on
    # the device, never a copy of every weight in host memory first.
    placed = {"device_map": device} if device.startswith("cuda") else {}
    model = cls.from_pretrained(model_dir, dtype="auto", **placed).to(device).eval()
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    context = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    log.info("loaded %s (%s) on %s in %.2fs", name, task, device, time.monotonic() - started)
    return Loaded(name, task, device, tokenizer, model, int(time.time()), context, files_fingerprint(model_dir))


def _number(body: dict[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise BadRequest(f"{key} must be a number between {lo} and {hi}", key)
    return float(value)


def _integer(body: dict[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise BadRequest(f"{key} must be an integer between {lo} and {hi}", key)
    return value


def _stops(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 4:
        return stop
    raise BadRequest("stop must be a string or a list of up to 4 strings", "stop")


class Engine:
    """One loaded model; one forward pass at a time."""

    def __init__(self, loaded: Loaded) -> None:
        self.m = loaded
        # One forward pass at a time: concurrent generate() calls on one CPU model only thrash.
        self._lock = threading.Lock()

    def prepare(self, prompt: str, body: dict[str, Any]) -> Generation:
        max_tokens = _integer(body, "max_tokens", 16, 1, 1_000_000)
        temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
        top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
        seed = body.get("seed")
        if seed is not None and (
            isinstance(seed, bool) or not isinstance(seed, int) or not SEED_MIN <= seed <= SEED_MAX
        ):
            raise BadRequest(f"seed must be an integer between {SEED_MIN} and {SEED_MAX}", "seed")
        tok = self.m.tokenizer
        inputs = tok(prompt, return_tensors="pt").to(self.m.device)
        prompt_tokens = int(inputs["input_ids"].shape[1])
        if prompt_tokens == 0:
            raise BadRequest("prompt is empty after tokenization", "prompt")
        ctx = self.m.context_length
        if ctx is not None and prompt_tokens + max_tokens > ctx:
            raise BadRequest(
                f"This model's maximum context length is {ctx} tokens. However, you requested "
                f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} for the "
                "completion). Please reduce the prompt or max_tokens.",
                "max_tokens" if prompt_tokens < ctx else "prompt",
                "context_length_exceeded",
            )
        kwargs: dict[str, Any] = {"max_new_tokens": max_tokens, "pad_token_id": tok.pad_token_id}
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
        else:
            kwargs.update(do_sample=False)
        return Generation(inputs, kwargs, _stops(body), prompt_tokens, max_tokens, seed)

    def _run(self, gen: Generation, **extra: Any) -> Any:
        with self._lock, torch.inference_mode():
            if gen.seed is not None:
                torch.manual_seed(gen.seed)
            return self.m.model.generate(**gen.inputs, **gen.kwargs, **extra)

    def generate(self, prompt: str, body: dict[str, Any]) -> dict[str, Any]:
        gen = self.prepare(prompt, body)
        output = self._run(gen)
        new_tokens = output[0][gen.prompt_tokens :]
        text = self.m.tokenizer.decode(new_tokens, skip_special_tokens=True)
        finish = "length" if len(new_tokens) >= gen.max_tokens else "stop"
        for stop in gen.stops:
            cut = text.find(stop)
            if cut >= 0:
                text, finish = text[:cut], "stop"
        return {
            "text": text,
            "finish_reason": finish,
            "prompt_tokens": gen.prompt_tokens,
            "completion_tokens": int(len(new_tokens)),
        }

    async def stream(self, gen: Generation, result: dict[str, Any]) -> AsyncIterator[str]:
        """Yield the completion's text as it is generated; fill `result` with the finish reason
        and token counts at the end. Closing the iterator early stops the generation."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[list[int] | None] = asyncio.Queue()
        cancel = threading.Event()

        def run() -> None:
            try:
                self._run(gen, streamer=_TokenFeed(loop, queue), stopping_criteria=[_Cancelled(cancel)])
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, None)

        worker = loop.run_in_executor(None, run)
        ids: list[int] = []
        emitted = 0
        finish = "length"
        # Text that could still turn out to be the start of a stop sequence is held back.
        hold = max((len(s) for s in gen.stops), default=1) - 1
        try:
            while (item := await queue.get()) is not None:
                ids.extend(item)
                text = self.m.tokenizer.decode(ids, skip_special_tokens=True)
                cut = min((i for i in (text.find(s) for s in gen.stops) if i >= 0), default=-1)
                if cut >= 0:
                    if cut > emitted:
                        yield text[emitted:cut]
                    emitted, finish = cut, "stop"
                    cancel.set()
                    break
                safe = len(text) - hold
                while safe > emitted and text[safe - 1] == "\ufffd":  # half of a multi-byte character
                    safe -= 1
                if safe > emitted:
                    yield text[emitted:safe]
                    emitted = safe
            else:
                text = self.m.tokenizer.decode(ids, skip_special_tokens=True)
                if len(text) > emitted:
                    yield text[emitted:]
                if len(ids) < gen.max_tokens:
                    finish = "stop"
            await worker
        finally:
            cancel.set()
        result.update(finish_reason=finish, prompt_tokens=gen.prompt_tokens, completion_tokens=len(ids))

    def chat_prompt(self, body: dict[str, Any]) -> str:
        messages = body.get("messages")
        if (
            not isinstance(messages, list)
            or not messages
            or not all(isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") for m in messages)
        ):
            raise BadRequest("messages must be a list of {role, content} objects", "messages")
        tok = self.m.tokenizer
        if getattr(tok, "chat_template", None):
            return str(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        # No template shipped with the model: a plain transcript it can continue.
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"

    def input_limit(self) -> int | None:
        """Tokens one input may have: the tokenizer's limit when it has a real one, and never past
        the model's positions (a tokenizer saved without model_max_length reports no limit)."""
        limits = [
            n
            for n in (getattr(self.m.tokenizer, "model_max_length", None), self.m.context_length)
            if isinstance(n, int) and 0 < n < _NO_LIMIT
        ]
        return min(limits) if limits else None

    def infer(self, texts: list[str]) -> tuple[list[Any], int, int | None]:
        """Outputs, tokens used, and the limit the inputs were cut to (None when none was cut)."""
        tok = self.m.tokenizer
        limit = self.input_limit()
        cut = limit is not None and any(len(ids) > limit for ids in tok(texts)["input_ids"])
        batch = tok(texts, return_tensors="pt", padding=True, truncation=limit is not None, max_length=limit)
        batch = batch.to(self.m.device)
        tokens = int(batch["attention_mask"].sum())
        with self._lock, torch.inference_mode():
            out = self.m.model(**batch)
        if self.m.task == TEXT_CLASSIFICATION:
            probs = out.logits.softmax(dim=-1)
            labels = self.m.model.config.id2label
            return (
                [[{"label": labels.get(i, str(i)), "score": float(p)} for i, p in enumerate(row)] for row in probs],
                tokens,
                limit if cut else None,
            )
        mask = batch["attention_mask"].unsqueeze(-1).to(out.last_hidden_state.dtype)
        pooled = (out.last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1)
        return pooled.float().tolist(), tokens, limit if cut else None


@dataclass
class Generation:
    inputs: Any
    kwargs: dict[str, Any]
    stops: list[str]
    prompt_tokens: int
    max_tokens: int
    seed: int | None


class _TokenFeed(BaseStreamer):
    """Hands the token ids generate() produces, in its thread, to the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[list[int] | None]) -> None:
        self._loop = loop
        self._queue = queue
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if not self._prompt_seen:  # generate() first hands over the prompt itself
            self._prompt_seen = True
            return
        self._loop.call_soon_threadsafe(self._queue.put_nowait, value.reshape(-1).tolist())

    def end(self) -> None:
        pass


class _Cancelled(StoppingCriteria):
    """Ends a generation whose client went away or that hit a stop sequence."""

    def __init__(self, event: threading.Event) -> None:
        self._event = event

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        return torch.full((input_ids.shape[0],), self._event.is_set(), dtype=torch.bool, device=input_ids.device)
