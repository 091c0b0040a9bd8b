"""Real architectures' config.json (the published values that matter for analysis), and a writer
that synthesizes their safetensors files: every tensor's real name, shape and dtype in the
header, the data region left sparse so a 7B model costs no disk.

Shapes come from transformers itself: the model is built on the `meta` device (no memory) from
the config, and its parameters are listed as `save_pretrained` would store them.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

_DTYPE = {"float32": ("F32", 4), "float16": ("F16", 2), "bfloat16": ("BF16", 2)}

LLAMA_2_7B: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 11008, "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 32, "max_position_embeddings": 4096, "rms_norm_eps": 1e-05,
    "vocab_size": 32000, "tie_word_embeddings": False, "torch_dtype": "float16",
    "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "rope_theta": 10000.0,
}  # fmt: skip

CORPUS: dict[str, dict[str, Any]] = {
    "llama-2-7b": LLAMA_2_7B,
    "mistral-7b": {
        "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
        "intermediate_size": 14336, "num_attention_heads": 32, "num_hidden_layers": 32,
        "num_key_value_heads": 8, "max_position_embeddings": 32768, "sliding_window": 4096,
        "vocab_size": 32000, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "rope_theta": 10000.0,
    },
    "qwen2-7b": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584,
        "intermediate_size": 18944, "num_attention_heads": 28, "num_hidden_layers": 28,
        "num_key_value_heads": 4, "max_position_embeddings": 131072, "vocab_size": 152064,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "rope_theta": 1000000.0,
    },
    "gpt2": {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_ctx": 1024, "n_embd": 768,
        "n_head": 12, "n_layer": 12, "n_positions": 1024, "vocab_size": 50257, "torch_dtype": "float32",
    },
    "bert-base-uncased": {
        "architectures": ["BertModel"], "model_type": "bert", "hidden_size": 768,
        "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
        "max_position_embeddings": 512, "type_vocab_size": 2, "vocab_size": 30522, "torch_dtype": "float32",
    },
    "vit-base-patch16-224": {
        "architectures": ["ViTForImageClassification"], "model_type": "vit", "hidden_size": 768,
        "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
        "image_size": 224, "patch_size": 16, "num_channels": 3, "torch_dtype": "float32",
        "id2label": {str(i): f"LABEL_{i}" for i in range(1000)},
    },
    "whisper-small": {
        "architectures": ["WhisperForConditionalGeneration"], "model_type": "whisper", "d_model": 768,
        "encoder_layers": 12, "decoder_layers": 12, "encoder_attention_heads": 12,
        "decoder_attention_heads": 12, "encoder_ffn_dim": 3072, "decoder_ffn_dim": 3072,
        "num_hidden_layers": 12, "num_mel_bins": 80, "max_source_positions": 1500,
        "max_target_positions": 448, "vocab_size": 51865, "torch_dtype": "float32",
    },
    "clip-vit-base-patch32": {
        "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": 512, "torch_dtype": "float32",
        "text_config": {"hidden_size": 512, "intermediate_size": 2048, "num_attention_heads": 8,
                        "num_hidden_layers": 12, "max_position_embeddings": 77, "vocab_size": 49408},
        "vision_config": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                          "num_hidden_layers": 12, "image_size": 224, "patch_size": 32},
    },
    "t5-small": {
        "architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "d_model": 512, "d_ff": 2048,
        "d_kv": 64, "num_heads": 8, "num_layers": 6, "num_decoder_layers": 6, "vocab_size": 32128,
        "relative_attention_num_buckets": 32, "torch_dtype": "float32", "n_positions": 512,
    },
}  # fmt: skip

# Published parameter counts (the model cards' "Safetensors" figures).
PARAMETERS = {
    "llama-2-7b": 6_738_415_616, "mistral-7b": 7_241_732_096, "qwen2-7b": 7_615_616_512,
    "gpt2": 124_439_808, "bert-base-uncased": 109_482_240, "vit-base-patch16-224": 86_567_656,
    "whisper-small": 241_734_912, "clip-vit-base-patch32": 151_277_313, "t5-small": 60_506_624,
}  # fmt: skip

GPTQ_CONFIG = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True}


def _shapes(config: dict[str, Any]) -> list[tuple[str, list[int]]]:
    import torch
    import transformers

    cfg = transformers.AutoConfig.for_model(**{k: v for k, v in config.items() if k != "architectures"})
    cls = getattr(transformers, config["architectures"][0])
    with torch.device("meta"):
        model = cls(cfg)
    return [(name, list(p.shape)) for name, p in model.named_parameters()]


def _gptq(shapes: list[tuple[str, list[int]]], group: int) -> list[tuple[str, list[int], str]]:
    """GPTQ's packed layout for every linear layer inside the decoder blocks."""
    out: list[tuple[str, list[int], str]] = []
    for name, shape in shapes:
        if ".layers." in name and name.endswith("proj.weight"):
            base, (rows, cols) = name[: -len(".weight")], shape
            out += [
                (f"{base}.qweight", [cols // 8, rows], "I32"),
                (f"{base}.qzeros", [cols // group, rows // 8], "I32"),
                (f"{base}.scales", [cols // group, rows], "F16"),
                (f"{base}.g_idx", [cols], "I32"),
            ]
        else:
            out.append((name, shape, "F16"))
    return out


def write_safetensors_header(path: Path, tensors: list[tuple[str, list[int], str]]) -> int:
    """A safetensors file with this header and a sparse data region of the right size."""
    sizes = {"F32": 4, "F16": 2, "BF16": 2, "I32": 4, "I8": 1, "U8": 1}
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype in tensors:
        n = sizes[dtype]
        for dim in shape:
            n *= dim
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        fh.truncate(8 + len(raw) + offset)  # sparse: no data blocks are written
    return offset


def write_corpus_model(directory: Path, key: str, *, quantized: bool = False) -> Path:
    """`directory` as a checkout of `key`: config.json, synthesized weights, tokenizer/processor."""
    config = dict(CORPUS[key])
    directory.mkdir(parents=True, exist_ok=True)
    dtype_name, _ = _DTYPE[config["torch_dtype"]]
    shapes = _shapes(config)
    if quantized:
        config["quantization_config"] = GPTQ_CONFIG
        tensors = _gptq(shapes, GPTQ_CONFIG["group_size"])
    else:
        tensors = [(name, shape, dtype_name) for name, shape in shapes]
    (directory / "config.json").write_text(json.dumps(config))
    write_safetensors_header(directory / "model.safetensors", tensors)
    (directory / "tokenizer.json").write_text("{}")
    if key in ("vit-base-patch16-224", "whisper-small", "clip-vit-base-patch32"):
        (directory / "preprocessor_config.json").write_text("{}")
    if key == "vit-base-patch16-224":
        (directory / "tokenizer.json").unlink()
    return directory
