"""The official `openai` client, pointed at the gateway, works unchanged: models, completions,
chat, streaming, and errors in OpenAI's envelope. Real gateway, real runtime, real GPT-2."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import openai
import pytest
import pytest_asyncio
from temporalio.testing import WorkflowEnvironment

from tests.helpers import make_settings, serving_model, unique

pytestmark = pytest.mark.slow


@pytest_asyncio.fixture(scope="module")
async def served(
    temporal_env: WorkflowEnvironment, demo_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[str, str]]:
    """(gateway URL, model name) of a loaded GPT-2."""
    tmp = tmp_path_factory.mktemp("openai")
    settings = make_settings(tmp, gateway={"port": 0, "max_tokens_limit": 256})
    name = unique("chat-gpt2")
    async with serving_model(settings, temporal_env.client, demo_models["text-generation"], name) as (running, _):
        yield f"http://127.0.0.1:{running.gateway_port}", name


@pytest_asyncio.fixture
async def client(served: tuple[str, str]) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=served[0] + "/v1", api_key="no-keys-configured", max_retries=0) as c:
        yield c


async def test_models_list(client: openai.AsyncOpenAI, served: tuple[str, str]) -> None:
    models = await client.models.list()
    ids = [m.id for m in models.data]
    assert served[1] in ids


async def test_completion_and_chat(client: openai.AsyncOpenAI, served: tuple[str, str]) -> None:
    name = served[1]
    completion = await client.completions.create(model=name, prompt="The model", max_tokens=5)
    assert completion.model == name
    assert isinstance(completion.choices[0].text, str)
    assert completion.usage is not None and 1 <= completion.usage.completion_tokens <= 5
    chat = await client.chat.completions.create(
        model=name, messages=[{"role": "user", "content": "Hello there"}], max_tokens=5
    )
    assert chat.choices[0].message.role == "assistant"
    assert isinstance(chat.choices[0].message.content, str)
    assert chat.choices[0].finish_reason in ("stop", "length")
    # The chat template of the model was applied: "<|user|>\nHello there\n<|assistant|>\n".
    assert chat.usage is not None and chat.usage.prompt_tokens > len("Hello there".split())


async def test_streaming_matches_the_whole_answer(client: openai.AsyncOpenAI, served: tuple[str, str]) -> None:
    name = served[1]
    # Greedy decoding: the streamed pieces must add up to the same text as one whole answer.
    whole = await client.completions.create(model=name, prompt="Hello", max_tokens=12, temperature=0)
    pieces = []
    finish = None
    stream = await client.completions.create(model=name, prompt="Hello", max_tokens=12, temperature=0, stream=True)
    async for chunk in stream:
        pieces.append(chunk.choices[0].text)
        finish = chunk.choices[0].finish_reason or finish
    assert len(pieces) > 1
    assert "".join(pieces) == whole.choices[0].text
    assert finish == whole.choices[0].finish_reason

    chat_pieces = []
    usage = None
    chat_stream = await client.chat.completions.create(
        model=name,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    async for chunk in chat_stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            chat_pieces.append(choice.delta.content or "")
    chat_whole = await client.chat.completions.create(
        model=name, messages=[{"role": "user", "content": "Hi"}], max_tokens=8, temperature=0
    )
    assert "".join(chat_pieces) == chat_whole.choices[0].message.content
    assert usage is not None and usage.completion_tokens == chat_whole.usage.completion_tokens  # type: ignore[union-attr]


async def test_stream_is_relayed_as_it_is_generated(served: tuple[str, str]) -> None:
    """The first event reaches the client long before the last: the gateway does not buffer."""
    url, name = served
    arrivals = []
    body = {"model": name, "prompt": "Once", "max_tokens": 200, "temperature": 0, "stream": True}
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        started = time.perf_counter()
        async with http.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    arrivals.append(time.perf_counter() - started)
    assert len(arrivals) > 10
    # Buffering would deliver every event at the end; relayed, the first comes well before.
    assert arrivals[0] < 0.5 * arrivals[-1], (arrivals[0], arrivals[-1])


async def test_errors_use_openai_envelope(client: openai.AsyncOpenAI, served: tuple[str, str]) -> None:
    name = served[1]
    with pytest.raises(openai.NotFoundError) as missing:
        await client.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    assert "no-such-model" in missing.value.message and name in missing.value.message
    assert missing.value.code == "model_not_found"

    with pytest.raises(openai.BadRequestError) as too_many:
        await client.completions.create(model=name, prompt="x", max_tokens=10_000)
    assert too_many.value.param == "max_tokens"  # type: ignore[attr-defined]
    assert "256" in too_many.value.message

    with pytest.raises(openai.BadRequestError) as no_messages:
        await client.chat.completions.create(model=name, messages=[], max_tokens=2)
    assert no_messages.value.param == "messages"  # type: ignore[attr-defined]

    with pytest.raises(openai.BadRequestError) as bad_name:
        await client.completions.create(model="../../etc/passwd", prompt="x", max_tokens=2)
    assert "invalid model name" in bad_name.value.message

    async with httpx.AsyncClient(base_url=served[0]) as http:
        bad_stream = await http.post("/v1/completions", json={"model": name, "prompt": "x", "stream": "yes"})
        assert bad_stream.status_code == 400
        assert bad_stream.json()["error"]["param"] == "stream"
        not_json = await http.post(
            "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert not_json.status_code == 400 and not_json.json()["error"]["type"] == "invalid_request_error"
        # The runtime's own checks come back in the same envelope, with the runtime's status.
        ctx = await http.post("/v1/completions", json={"model": name, "prompt": "x", "max_tokens": 255, "top_p": 5})
        assert ctx.status_code == 400 and ctx.json()["error"]["param"] == "top_p"


async def test_a_stream_waiting_on_a_cold_model_hears_its_load_progress(
    client: openai.AsyncOpenAI, served: tuple[str, str]
) -> None:
    """While the model loads, a streamed request gets SSE comments (`: loading NAME 1.0s of ~4.1s`),
    then the runtime's stream; the official client, which skips comments, reads it unchanged."""
    url, name = served
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:

        async def unload() -> None:
            response = await http.post(f"/models/{name}/unload", json={"wait": True})
            assert response.status_code == 200 and response.json()["phase"] == "unloaded", response.text

        await unload()
        body = {"model": name, "prompt": "Once", "max_tokens": 4, "stream": True}
        comments, data = [], []
        async with http.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith(":"):
                    assert not data, "a comment after the first chunk"
                    comments.append(line)
                elif line.startswith("data: "):
                    data.append(line)
        assert comments and comments[0].startswith(f": loading {name} 0.0s of ~"), comments
        assert data[-1] == "data: [DONE]" and any('"text_completion"' in d for d in data), data

        await unload()
        stream = await client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, stream=True
        )
        chunks = [chunk async for chunk in stream]
        assert chunks and chunks[-1].choices[0].finish_reason in ("stop", "length")
        assert all(c.model == name for c in chunks)
