"""Tiny random models made locally, for tests and the README demo (nothing is downloaded).

`make_tiny_model(path, kind="llama")` writes a Hugging Face style model directory: config.json,
generation_config.json, model.safetensors (random weights from a fixed seed, so every run writes the
same bytes), and a word-level tokenizer built with the `tokenizers` library (tokenizer.json +
tokenizer_config.json + special_tokens_map.json). `kind="qwen2"` writes a Qwen2-style model with
`tie_word_embeddings=true` (one tensor serves as input embedding and output head). Serve the Qwen2 one
with `--dtype float32`: vLLM 0.32's CPU build kills its worker (SIGILL) running it in bf16 on these AMX
machines, and in float32 for some prompts (one of 4 tokens) or from a float32 checkpoint; whatever the
loader.

`copy_without_weights(src, dst)` makes the directory a swarm leecher starts from: everything but the
weight files.

Imports torch, safetensors and tokenizers only (no vLLM), so scripts can use it without starting vLLM.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

#: File name patterns of weights (what a leecher's model directory does not need).
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.safetensors.index.json", "*.bin.index.json")

_WORDS = (
    "the a an one two three four five six seven eight nine ten red green blue cat dog bird fish tree "
    "house river stone sun moon star sky rain snow wind fire water earth light dark small big old new "
    "fast slow hot cold good bad happy sad is are was were be has have had do does did go goes went "
    "see saw look run ran walk jump eat drink sleep sing play read write open close give take make "
    "hello world swarm seed peer piece load model weight token vllm and or but if then so of to in on "
    "at by for with from up down left right yes no , . ! ?"
).split()


def _tokenizer_files(path: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab: dict[str, int] = {}
    for word in [*specials, *_WORDS]:
        vocab.setdefault(word, len(vocab))
    i = 0
    while len(vocab) < vocab_size:  # filler words so every id decodes to something readable
        vocab.setdefault(f"w{i}", len(vocab))
        i += 1
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    from tokenizers import decoders

    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "pad_token": "<pad>",
                "model_max_length": 2048,
                "add_bos_token": False,
                "clean_up_tokenization_spaces": False,
            },
            indent=2,
        )
    )
    (path / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"})
    )


def _config(kind: str, vocab_size: int, hidden: int, layers: int) -> dict[str, Any]:
    common: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": hidden * 2,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": hidden // 4,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 3,
        "torch_dtype": "bfloat16",
        "initializer_range": 0.5,
    }
    if kind == "llama":
        return {
            **common,
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "tie_word_embeddings": False,
            "attention_bias": False,
            "mlp_bias": False,
        }
    if kind == "qwen2":
        return {
            **common,
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "tie_word_embeddings": True,
            "use_sliding_window": False,
            "sliding_window": None,
            "max_window_layers": layers,
        }
    raise ValueError(f"unknown tiny model kind {kind!r} (llama or qwen2)")


def _tensor_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor names and shapes of a Llama/Qwen2 decoder (Hugging Face naming).

    Written out by hand rather than instantiating a transformers model: that import pulls in
    torchaudio, which the CPU environment cannot load, and it is slower."""
    h, inter, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    d = config["head_dim"]
    q, kv = config["num_attention_heads"] * d, config["num_key_value_heads"] * d
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "self_attn.q_proj.weight"] = (q, h)
        shapes[p + "self_attn.k_proj.weight"] = (kv, h)
        shapes[p + "self_attn.v_proj.weight"] = (kv, h)
        if config["model_type"] == "qwen2":
            shapes[p + "self_attn.q_proj.bias"] = (q,)
            shapes[p + "self_attn.k_proj.bias"] = (kv,)
            shapes[p + "self_attn.v_proj.bias"] = (kv,)
        shapes[p + "self_attn.o_proj.weight"] = (h, q)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes[p + "mlp.gate_proj.weight"] = (inter, h)
        shapes[p + "mlp.up_proj.weight"] = (inter, h)
        shapes[p + "mlp.down_proj.weight"] = (h, inter)
    shapes["model.norm.weight"] = (h,)
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, h)
    return shapes


def make_tiny_model(
    path: str | Path,
    kind: str = "llama",
    *,
    vocab_size: int = 512,
    hidden: int = 256,
    layers: int = 4,
    seed: int = 0,
) -> Path:
    """Write a tiny random model directory at `path` (created or overwritten); returns the path.

    Defaults give ~2.6M parameters, ~5 MB in bf16: big enough for several pieces at a 256 KiB piece
    size, small enough to load in a second. The weights are drawn with a wide spread so that greedy
    decoding is sensitive to every byte (a wrong piece changes the completion).
    """
    import torch
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for pattern in WEIGHT_PATTERNS:
        for f in path.glob(pattern):
            f.unlink()
    config = _config(kind, vocab_size, hidden, layers)
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    (path / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3, "do_sample": False})
    )
    _tokenizer_files(path, vocab_size)

    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in _tensor_shapes(config).items():
        if "norm" in name:
            # Norm weights near 1 with some spread: random but numerically tame.
            value = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            value = torch.randn(shape, generator=gen) * (0.5 if len(shape) > 1 else 0.1)
        state[name] = value.to(torch.bfloat16).contiguous()
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def copy_without_weights(src: str | Path, dst: str | Path) -> Path:
    """Copy a model directory without its weight files (what a swarm leecher needs)."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not any(f.match(p) for p in WEIGHT_PATTERNS):
            shutil.copy2(f, dst / f.name)
    return dst
