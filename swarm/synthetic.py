"""A synthetic model for demos, tests and benchmarks without vLLM: same names, shapes and bytes on every
node that asks for the same size, so independent processes form one swarm.

The layout imitates a transformer checkpoint: per layer, a few large matrices and small norm vectors,
plus an embedding, in bf16 (2 bytes per element). Content is pseudo-random from a fixed seed, generated
on the CPU and moved to the requested device (no download, no disk).
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from swarm.manifest import SwarmKey

_LAYER_MATRICES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def synthetic_key(nbytes: int) -> SwarmKey:
    return SwarmKey(model_id=f"synthetic-{nbytes}", dtype="bfloat16", engine="swarm-synthetic")


def synthetic_shapes(nbytes: int) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes adding up to about `nbytes` (bf16), transformer-like."""
    elements = max(nbytes // 2, 1024)
    hidden = 256
    while hidden * hidden * 8 * 24 < elements and hidden < 8192:
        hidden *= 2
    per_layer = len(_LAYER_MATRICES) * hidden * hidden + 2 * hidden
    embed = min(elements // 8, 32000 * hidden)
    vocab = max(embed // hidden, 1)
    layers = max((elements - 2 * vocab * hidden) // per_layer, 1)
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        shapes.append((f"model.layers.{i}.input_layernorm.weight", (hidden,)))
        for m in _LAYER_MATRICES:
            shapes.append((f"model.layers.{i}.{m}.weight", (hidden, hidden)))
        shapes.append((f"model.layers.{i}.post_attention_layernorm.weight", (hidden,)))
    shapes.append(("model.norm.weight", (hidden,)))
    shapes.append(("lm_head.weight", (vocab, hidden)))
    return shapes


def synthetic_tensors(
    nbytes: int, *, fill: bool = True, device: str = "cpu"
) -> OrderedDict[str, torch.Tensor]:
    """The synthetic model's tensors; `fill=False` allocates zeros (what a leecher starts from)."""
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    gen = torch.Generator().manual_seed(nbytes)  # on the CPU: the same bytes whatever the device
    for name, shape in synthetic_shapes(nbytes):
        if fill:
            t = torch.randint(-(2**15), 2**15, shape, dtype=torch.int16, generator=gen)
            out[name] = t.view(torch.bfloat16).to(device)
        else:
            out[name] = torch.zeros(shape, dtype=torch.bfloat16, device=device)
    return out
