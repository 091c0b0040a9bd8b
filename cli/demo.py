"""Writes tiny models with random weights and a locally trained tokenizer: no download needed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

_CORPUS = [
    "Modelium serves many models on a few GPUs with no hand work.",
    "Drop a model directory into the watched folder and it is served.",
    "The quick brown fox jumps over the lazy dog.",
    "A model idle for a while is unloaded, and loaded again when a request asks for it.",
    "Temporal keeps every model's life durable, visible and retryable.",
    "Hello world! How are you today? I am fine, thank you.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000.",
]

# ChatML-style turns, as many chat models ship them.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _tokenizer(vocab_size: int) -> object:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )


def write_demo_model(
    directory: str | Path,
    *,
    task: str = "text-generation",
    layers: int = 2,
    width: int = 32,
    context: int = 256,
    seed: int = 0,
) -> Path:
    """Write a tiny GPT-2 (text-generation) or BERT (text-classification / feature-extraction)."""
    import torch
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        BertModel,
        GPT2Config,
        GPT2LMHeadModel,
    )

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tokenizer = _tokenizer(vocab_size=400)
    vocab = len(tokenizer)  # type: ignore[arg-type]
    config: Any
    if task == "text-generation":
        config = GPT2Config(
            vocab_size=vocab,
            n_positions=context,
            n_embd=width,
            n_layer=layers,
            n_head=2,
            bos_token_id=tokenizer.bos_token_id,  # type: ignore[attr-defined]
            eos_token_id=tokenizer.eos_token_id,  # type: ignore[attr-defined]
        )
        model: object = GPT2LMHeadModel(config)
    else:
        config = BertConfig(
            vocab_size=vocab,
            hidden_size=width,
            num_hidden_layers=layers,
            num_attention_heads=2,
            intermediate_size=width * 2,
            max_position_embeddings=context,
            id2label={0: "negative", 1: "positive"},
            label2id={"negative": 0, "positive": 1},
        )
        model = BertForSequenceClassification(config) if task == "text-classification" else BertModel(config)
    if task == "text-generation":
        # A chat template, so /v1/chat/completions formats messages the way the model expects.
        tokenizer.chat_template = CHAT_TEMPLATE  # type: ignore[attr-defined]
    model.save_pretrained(out)  # type: ignore[attr-defined]
    tokenizer.save_pretrained(out)  # type: ignore[attr-defined]
    return out
