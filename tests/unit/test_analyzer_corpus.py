"""The analyzer on real architectures' config.json with synthesized safetensors headers (real
tensor names, shapes and dtypes; sparse data), plus GGUF, ONNX and Triton layouts."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

from modelium import memory
from modelium.analyzer import ModelDirectoryError, analyze_directory
from modelium.types import Modality, ModelFormat, Task
from tests.corpus import CORPUS, PARAMETERS, write_corpus_model, write_safetensors_header

# What each architecture is, and its KV cache per token worked out by hand from the published
# config: 2 (K and V) x layers x KV heads x head size x bytes.
EXPECTED: dict[str, tuple[str, str, str, int | None]] = {
    "llama-2-7b": (Task.TEXT_GENERATION, Modality.TEXT, "F16", 2 * 32 * 32 * 128 * 2),
    "mistral-7b": (Task.TEXT_GENERATION, Modality.TEXT, "BF16", 2 * 32 * 8 * 128 * 2),  # GQA: 8 KV heads
    "qwen2-7b": (Task.TEXT_GENERATION, Modality.TEXT, "BF16", 2 * 28 * 4 * 128 * 2),
    "gpt2": (Task.TEXT_GENERATION, Modality.TEXT, "F32", 2 * 12 * 12 * 64 * 4),
    "bert-base-uncased": (Task.FEATURE_EXTRACTION, Modality.TEXT, "F32", None),
    "vit-base-patch16-224": (Task.IMAGE_CLASSIFICATION, Modality.VISION, "F32", None),
    "whisper-small": (Task.AUTOMATIC_SPEECH_RECOGNITION, Modality.AUDIO, "F32", 2 * 12 * 12 * 64 * 4),
    "clip-vit-base-patch32": (Task.ZERO_SHOT_IMAGE_CLASSIFICATION, Modality.MULTIMODAL, "F32", None),
    "t5-small": (Task.TEXT2TEXT_GENERATION, Modality.TEXT, "F32", 2 * 6 * 8 * 64 * 4),
}


@pytest.mark.parametrize("key", sorted(CORPUS))
def test_real_architectures(key: str, tmp_path: Path) -> None:
    analysis = analyze_directory(write_corpus_model(tmp_path / key, key), key)
    task, modality, dtype, kv_per_token = EXPECTED[key]
    assert (analysis.task, analysis.modality, analysis.dtype) == (task, modality, dtype)
    assert analysis.parameter_count == PARAMETERS[key], "exact, from the safetensors headers"
    assert analysis.kv_bytes_per_token == kv_per_token
    # The estimate is the formula of modelium.memory, term by term, for every runtime.
    context = min(analysis.context_length or 0, 4096)
    for runtime, profile in memory.PROFILES.items():
        kv = (kv_per_token or 0) * context * profile.concurrent_sequences
        expected = int(analysis.weight_bytes * (1 + profile.weight_slack)) + kv + profile.overhead_bytes
        assert analysis.memory_estimates[runtime] == expected, runtime
    assert analysis.memory_estimate_bytes == analysis.memory_estimates["embedded"]


def test_llama_numbers_a_user_can_check(tmp_path: Path) -> None:
    a = analyze_directory(write_corpus_model(tmp_path / "llama", "llama-2-7b"), "llama")
    assert a.weight_bytes >= 6_738_415_616 * 2  # fp16
    assert a.kv_bytes_per_token == 512 * 1024  # the well-known 0.5 MiB per token of Llama-2-7B
    # 4096 tokens of one sequence (embedded): 2 GiB of KV on top of 1.2 x 12.55 GiB and 400 MiB.
    assert 17 * 2**30 < a.memory_estimates["embedded"] < 18 * 2**30


def test_gptq_quantized_model(tmp_path: Path) -> None:
    a = analyze_directory(write_corpus_model(tmp_path / "gptq", "llama-2-7b", quantized=True), "gptq")
    assert a.quantization == "gptq 4-bit"
    assert 3.4 * 2**30 < a.weight_bytes < 4.0 * 2**30  # published GPTQ 4-bit Llama-2-7B: ~3.9 GB
    assert a.parameter_count is None and int(a.details["stored_elements"]) > 0
    assert a.kv_bytes_per_token == 512 * 1024  # keys and values stay 16-bit


def test_model_card_chat_template_and_bin_weights(tmp_path: Path) -> None:
    d = write_corpus_model(tmp_path / "m", "gpt2")
    (d / "README.md").write_text("---\nlicense: mit\npipeline_tag: text-generation\nbase_model:\n- gpt2\n---\n# Hi\n")
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    a = analyze_directory(d, "m")
    assert (a.license, a.pipeline_tag, a.base_model, a.has_chat_template) == ("mit", "text-generation", "gpt2", True)
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    b = analyze_directory(d, "m")
    assert b.weight_files == ["pytorch_model.bin"] and b.parameter_count is None
    assert b.weight_bytes == (d / "pytorch_model.bin").stat().st_size


def test_vision_model_without_processor_is_named(tmp_path: Path) -> None:
    d = write_corpus_model(tmp_path / "vit", "vit-base-patch16-224")
    (d / "preprocessor_config.json").unlink()
    with pytest.raises(ModelDirectoryError, match="image-classification needs its input processor"):
        analyze_directory(d, "vit")


# -- GGUF --------------------------------------------------------------------------------------
def _gguf_string(s: str) -> bytes:
    raw = s.encode()
    return struct.pack("<Q", len(raw)) + raw


def _gguf_value(v: Any) -> bytes:
    if isinstance(v, str):
        return struct.pack("<I", 8) + _gguf_string(v)
    if isinstance(v, list):
        return struct.pack("<IIQ", 9, 8, len(v)) + b"".join(_gguf_string(x) for x in v)
    return struct.pack("<II", 4, v)  # uint32


def write_gguf(path: Path, metadata: dict[str, Any], tensors: list[tuple[str, list[int]]]) -> None:
    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata))
    for key, value in metadata.items():
        out += _gguf_string(key) + _gguf_value(value)
    offset = 0
    for name, shape in tensors:
        out += _gguf_string(name) + struct.pack("<I", len(shape)) + b"".join(struct.pack("<Q", d) for d in shape)
        out += struct.pack("<IQ", 12, offset)  # Q4_K
        offset += 1
    path.write_bytes(out)


def test_gguf_header(tmp_path: Path) -> None:
    d = tmp_path / "llama-gguf"
    d.mkdir()
    meta = {
        "general.architecture": "llama",
        "general.name": "Llama 2 7B",
        "general.file_type": 15,
        "llama.context_length": 4096,
        "llama.block_count": 32,
        "llama.attention.head_count": 32,
        "llama.attention.head_count_kv": 32,
        "llama.embedding_length": 4096,
        "tokenizer.ggml.tokens": ["<unk>", "<s>", "</s>"],
    }
    write_gguf(
        d / "llama-2-7b.Q4_K_M.gguf", meta, [("token_embd.weight", [4096, 32000]), ("output.weight", [4096, 32000])]
    )
    a = analyze_directory(d, "llama-gguf")
    assert (a.format, a.architecture, a.task, a.quantization) == (
        ModelFormat.GGUF,
        "llama",
        Task.TEXT_GENERATION,
        "Q4_K_M",
    )
    assert a.parameter_count == 2 * 4096 * 32000 and a.context_length == 4096 and a.has_tokenizer
    assert a.kv_bytes_per_token == 2 * 32 * 32 * 128 * 2
    (d / "llama-2-7b.Q4_K_M.gguf").write_bytes(b"GGUF" + struct.pack("<I", 3) + b"\x01")
    with pytest.raises(ModelDirectoryError, match="ends inside its header"):
        analyze_directory(d, "llama-gguf")


# -- ONNX and Triton ---------------------------------------------------------------------------
def _varint(n: int) -> bytes:
    out = b""
    while True:
        byte, n = n & 0x7F, n >> 7
        out += bytes([byte | (0x80 if n else 0)])
        if not n:
            return out


def _field(number: int, payload: bytes | int) -> bytes:
    if isinstance(payload, int):
        return _varint(number << 3) + _varint(payload)
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def write_onnx(path: Path, inputs: list[str], outputs: list[str], weights: int = 4096) -> None:
    """A ModelProto per onnx.proto's field numbers: IR version, producer, opset, and a graph with
    an initializer (the weights, skipped by the reader), inputs and outputs."""
    initializer = _field(8, b"w") + _field(9, b"\0" * weights)  # TensorProto name, raw_data
    graph = _field(2, b"main") + _field(5, initializer)
    graph += b"".join(_field(11, _field(1, i.encode())) for i in inputs)
    graph += b"".join(_field(12, _field(1, o.encode())) for o in outputs)
    model = _field(1, 8) + _field(2, b"pytorch") + _field(7, graph) + _field(8, _field(2, 17))
    path.write_bytes(model)


def test_onnx_model(tmp_path: Path) -> None:
    d = tmp_path / "resnet-onnx"
    d.mkdir()
    write_onnx(d / "model.onnx", ["pixel_values"], ["logits"])
    a = analyze_directory(d, "resnet-onnx")
    assert (a.format, a.task) == (ModelFormat.ONNX, Task.CUSTOM)
    assert a.details["inputs"] == "pixel_values" and a.details["outputs"] == "logits"
    assert a.details["opset"] == "17" and a.details["producer"] == "pytorch"
    (d / "model.onnx").write_bytes(b"\x08\x08\x12\xff\xff\xff")  # cut off mid-field
    with pytest.raises(ModelDirectoryError):
        analyze_directory(d, "resnet-onnx")


def test_triton_entry(tmp_path: Path) -> None:
    d = tmp_path / "densenet"
    d.mkdir()
    (d / "config.pbtxt").write_text('name: "densenet"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 8\n')
    with pytest.raises(ModelDirectoryError, match="no numbered version folder"):
        analyze_directory(d, "densenet")
    (d / "1").mkdir()
    write_onnx(d / "1" / "model.onnx", ["data_0"], ["fc6_1"])
    a = analyze_directory(d, "densenet")
    assert (a.format, a.architecture, a.task) == (ModelFormat.TRITON, "onnxruntime_onnx", Task.CUSTOM)
    assert a.details["versions"] == "1" and a.details["max_batch_size"] == "8"
    assert a.weight_bytes == (d / "1" / "model.onnx").stat().st_size


def test_unknown_layout_is_reported(tmp_path: Path) -> None:
    d = tmp_path / "mystery"
    d.mkdir()
    (d / "weights.pt").write_bytes(b"\0" * 100)
    with pytest.raises(ModelDirectoryError, match="no config.json.*no \\*.gguf, \\*.onnx or Triton config.pbtxt"):
        analyze_directory(d, "mystery")


def test_sparse_safetensors_helper_is_honest(tmp_path: Path) -> None:
    # The synthesized files have exactly the size their headers describe: the truncation check
    # of the analyzer sees a complete file.
    size = write_safetensors_header(tmp_path / "x.safetensors", [("w", [1000, 1000], "F16")])
    assert size == 2_000_000
    header_len = struct.unpack("<Q", (tmp_path / "x.safetensors").read_bytes()[:8])[0]
    assert (tmp_path / "x.safetensors").stat().st_size == 8 + header_len + size
