"""The process that serves one model for the embedded runtime.

Run as `python -m modelium.runtimes.embedded_server --model-dir DIR --name NAME --task TASK ...`.
The model is loaded before the port is bound, so `/health` answering means ready.

Text generation: `/v1/completions`, `/v1/chat/completions` (OpenAI protocol), `/v1/models`.
Classification and embeddings: `POST /predict {"inputs": str | [str]}`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import torch
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
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
MAX_BATCH = 64


class BadRequest(ValueError):
    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


# What torch.manual_seed takes.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
# Tokenizers without a real limit report this (or larger) as model_max_length.
_NO_LIMIT = 1_000_000


def _error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


@dataclass
class Loaded:
    name: str
    task: str
    device: str
    tokenizer: Any
    model: Any
    created: int
    context_length: int | None


def load(model_dir: str, name: str, task: str, device: str) -> Loaded:
    started = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    cls = {
        TEXT_GENERATION: AutoModelForCausalLM,
        TEXT_CLASSIFICATION: AutoModelForSequenceClassification,
        FEATURE_EXTRACTION: AutoModel,
    }[task]
    model = cls.from_pretrained(model_dir, dtype="auto").to(device).eval()
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    context = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    log.info("loaded %s (%s) on %s in %.2fs", name, task, device, time.monotonic() - started)
    return Loaded(name, task, device, tokenizer, model, int(time.time()), context)


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


class Server:
    def __init__(self, loaded: Loaded) -> None:
        self.m = loaded
        # One forward pass at a time: concurrent generate() calls on one CPU model only thrash.
        self._lock = threading.Lock()

    # -- text generation -------------------------------------------------------------------
    def _prepare(self, prompt: str, body: dict[str, Any]) -> _Generation:
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
        return _Generation(inputs, kwargs, _stops(body), prompt_tokens, max_tokens, seed)

    def _run(self, gen: _Generation, **extra: Any) -> Any:
        with self._lock, torch.inference_mode():
            if gen.seed is not None:
                torch.manual_seed(gen.seed)
            return self.m.model.generate(**gen.inputs, **gen.kwargs, **extra)

    def generate(self, prompt: str, body: dict[str, Any]) -> dict[str, Any]:
        gen = self._prepare(prompt, body)
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

    async def stream(self, gen: _Generation, result: dict[str, Any]) -> AsyncIterator[str]:
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

    async def completions(self, request: Request) -> Response:
        body = await _json(request)
        prompt = body.get("prompt")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if (
            not isinstance(prompts, list)
            or not prompts
            or len(prompts) > MAX_BATCH
            or not all(isinstance(p, str) for p in prompts)
        ):
            raise BadRequest(f"prompt must be a string or a list of 1-{MAX_BATCH} strings", "prompt")
        ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if _streaming(body):
            if len(prompts) != 1:
                raise BadRequest("stream supports one prompt per request", "prompt")
            gen = self._prepare(prompts[0], body)  # bad parameters are a 400, not a broken stream
            result: dict[str, Any] = {}

            def chunk(text: str, finish: str | None) -> dict[str, Any]:
                return {
                    "id": ident,
                    "object": "text_completion",
                    "created": created,
                    "model": self.m.name,
                    "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
                }

            return _sse(self.stream(gen, result), chunk, result, body)
        results = [await run_in_threadpool(self.generate, p, body) for p in prompts]
        return JSONResponse(
            {
                "id": ident,
                "object": "text_completion",
                "created": created,
                "model": self.m.name,
                "choices": [
                    {"index": i, "text": r["text"], "finish_reason": r["finish_reason"], "logprobs": None}
                    for i, r in enumerate(results)
                ],
                "usage": _usage(results),
            }
        )

    def _chat_prompt(self, body: dict[str, Any]) -> str:
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

    async def chat_completions(self, request: Request) -> Response:
        body = await _json(request)
        if "max_completion_tokens" in body and "max_tokens" not in body:
            body["max_tokens"] = body["max_completion_tokens"]
        prompt = self._chat_prompt(body)
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if _streaming(body):
            gen = self._prepare(prompt, body)
            result: dict[str, Any] = {}
            first = True

            def chunk(text: str, finish: str | None) -> dict[str, Any]:
                nonlocal first
                delta: dict[str, Any] = {"content": text} if finish is None else {}
                if first:
                    delta["role"], first = "assistant", False
                choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
                return {
                    "id": ident,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": self.m.name,
                    "choices": [choice],
                }

            return _sse(self.stream(gen, result), chunk, result, body)
        done = await run_in_threadpool(self.generate, prompt, body)
        return JSONResponse(
            {
                "id": ident,
                "object": "chat.completion",
                "created": created,
                "model": self.m.name,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": done["text"]},
                        "finish_reason": done["finish_reason"],
                    }
                ],
                "usage": _usage([done]),
            }
        )

    # -- classification / embeddings -------------------------------------------------------
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

    async def predict(self, request: Request) -> JSONResponse:
        body = await _json(request)
        inputs = body.get("inputs")
        texts = [inputs] if isinstance(inputs, str) else inputs
        if (
            not isinstance(texts, list)
            or not texts
            or len(texts) > MAX_BATCH
            or not all(isinstance(t, str) and t for t in texts)
        ):
            raise BadRequest(f"inputs must be a string or a list of 1-{MAX_BATCH} strings", "inputs")
        if self.m.task == TEXT_GENERATION:
            results = [await run_in_threadpool(self.generate, t, body) for t in texts]
            outputs: list[Any] = [r["text"] for r in results]
            usage = _usage(results)
            cut_to = None
        else:
            outputs, tokens, cut_to = await run_in_threadpool(self.infer, texts)
            usage = {"prompt_tokens": tokens, "completion_tokens": 0, "total_tokens": tokens}
        output = outputs[0] if isinstance(inputs, str) else outputs
        answer: dict[str, Any] = {"model": self.m.name, "task": self.m.task, "output": output, "usage": usage}
        if cut_to is not None:
            answer["truncated"] = True
            answer["warning"] = f"inputs longer than the model's limit of {cut_to} tokens were truncated to it"
        return JSONResponse(answer)

    # -- misc ------------------------------------------------------------------------------
    async def health(self, request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "model": self.m.name, "task": self.m.task})

    async def models(self, request: Request) -> JSONResponse:
        return JSONResponse(
            {
                "object": "list",
                "data": [{"id": self.m.name, "object": "model", "created": self.m.created, "owned_by": "modelium"}],
            }
        )

    def app(self) -> Starlette:
        routes = [
            Route("/health", self.health),
            Route("/v1/models", self.models),
            Route("/predict", _guard(self.predict), methods=["POST"]),
        ]
        if self.m.task == TEXT_GENERATION:
            routes += [
                Route("/v1/completions", _guard(self.completions), methods=["POST"]),
                Route("/v1/chat/completions", _guard(self.chat_completions), methods=["POST"]),
            ]
        return Starlette(routes=routes)


@dataclass
class _Generation:
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


def _streaming(body: dict[str, Any]) -> bool:
    stream = body.get("stream", False)
    if stream is None:
        return False
    if not isinstance(stream, bool):
        raise BadRequest("stream must be true or false", "stream")
    return stream


def _sse(
    pieces: AsyncIterator[str],
    chunk: Callable[[str, str | None], dict[str, Any]],
    result: dict[str, Any],
    body: dict[str, Any],
) -> StreamingResponse:
    """OpenAI's server-sent events: a chunk per piece of text, a last chunk with the finish reason,
    a usage chunk when `stream_options.include_usage` asks for it, then `[DONE]`."""
    options = body.get("stream_options") or {}
    include_usage = isinstance(options, dict) and bool(options.get("include_usage"))

    async def events() -> AsyncIterator[bytes]:
        try:
            async for piece in pieces:
                yield _event(chunk(piece, None))
        except Exception as exc:  # the status line is sent already: report it in the stream
            log.exception("generation failed mid-stream")
            yield _event(
                {"error": {"message": f"generation failed: {exc}", "type": "server_error", "param": None, "code": None}}
            )
            return
        finally:
            await pieces.aclose()  # type: ignore[attr-defined]
        last = chunk("", result["finish_reason"])
        yield _event(last)
        if include_usage:
            yield _event({**last, "choices": [], "usage": _usage([result])})
        yield b"data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _event(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


def _usage(results: list[dict[str, Any]]) -> dict[str, int]:
    prompt = sum(r["prompt_tokens"] for r in results)
    completion = sum(r["completion_tokens"] for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _json(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise BadRequest("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    return body


def _guard(handler: Any) -> Any:
    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except BadRequest as exc:
            return _error(400, str(exc), exc.param, exc.code)

    return wrapped


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--task", required=True, choices=[TEXT_GENERATION, TEXT_CLASSIFICATION, FEATURE_EXTRACTION])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    server = Server(load(args.model_dir, args.name, args.task, args.device))
    uvicorn.run(server.app(), host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
