"""Which tensors of a model a rank swarms, in which order, and how to check them after post-processing.

Plain torch (`nn.Module`), no vLLM import: unit-testable without an engine.

What is swarmed: every parameter and every *persistent* buffer of the model, right after the weights are
in place and BEFORE vLLM's `process_weights_after_loading` (the "loaded" stage; docs/loader.md says why
not the post-processed state). Non-persistent buffers (rotary caches and the like) are computed by the
modules themselves and never come from a checkpoint, so every instance computes its own, exactly as a disk
load does. Order: `named_parameters(remove_duplicate=False)` then `named_buffers(...)`, which is the
module registration order, the same on every instance built from the same configuration.

Tied weights: a tensor reachable under several names (a tied `lm_head.weight` is the embedding's
Parameter object; two Parameters may also view one memory) is swarmed once, under its first name; the
other names are returned as aliases of it. Since the leecher fills the very tensors its model was built
with, the tie holds by construction; the aliases are for logs and checks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from swarm.errors import ManifestError


@dataclass
class SwarmTensors:
    """The ordered tensors of one rank (views sharing the model's memory) and the names tied to them."""

    tensors: dict[str, torch.Tensor]
    aliases: dict[str, str] = field(default_factory=dict)
    #: names skipped because they hold no bytes
    empty: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def _persistent_buffers(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    out = []
    for module_name, module in model.named_modules(remove_duplicate=False):
        skip = getattr(module, "_non_persistent_buffers_set", set())
        for leaf, buf in module._buffers.items():
            if buf is None or leaf in skip:
                continue
            out.append((f"{module_name}.{leaf}" if module_name else leaf, buf))
    return out


def swarm_tensors(model: nn.Module) -> SwarmTensors:
    """The tensors this rank swarms (see the module docstring). Raises ManifestError when a tensor cannot
    be swarmed as it is: on the meta device (online quantization allocates while loading) or not
    contiguous (the swarm writes raw bytes and never copies parameters silently)."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    empty: list[str] = []
    by_id: dict[int, str] = {}
    by_memory: dict[tuple[int, int, str, tuple[int, ...]], str] = {}
    entries = list(model.named_parameters(remove_duplicate=False)) + _persistent_buffers(model)
    for name, t in entries:
        if name in tensors or name in aliases:
            continue
        canonical = by_id.get(id(t))
        if canonical is not None:
            aliases[name] = canonical
            continue
        by_id[id(t)] = name
        if t.device.type == "meta":
            raise ManifestError(
                f"tensor {name!r} is on the meta device after the model was built",
                hint="this model or quantization allocates its weights while loading; "
                "--load-format swarm cannot fill it ahead of time",
            )
        if t.numel() == 0:
            empty.append(name)
            continue
        if not t.is_contiguous():
            raise ManifestError(f"tensor {name!r} is not contiguous (stride {list(t.stride())})")
        memory = (t.data_ptr(), t.numel() * t.element_size(), str(t.dtype), tuple(t.shape))
        canonical = by_memory.get(memory)
        if canonical is not None:
            aliases[name] = canonical
            continue
        by_memory[memory] = name
        tensors[name] = t.detach()
    return SwarmTensors(tensors, aliases, empty)


def replaced_bytes(model: nn.Module, swarmed: SwarmTensors) -> int:
    """Bytes of swarmed tensors that the model no longer uses (post-processing replaced them: on CPU,
    vLLM packs linear weights into oneDNN buffers and empties the parameters). A serving rank keeps
    these alive to serve them; this is the memory that costs."""
    live = {t.data_ptr() for _, t in model.named_parameters(remove_duplicate=False) if t.numel()}
    live |= {t.data_ptr() for _, t in model.named_buffers(remove_duplicate=False) if t.numel()}
    return sum(t.numel() * t.element_size() for t in swarmed.tensors.values() if t.data_ptr() not in live)


def changed_tensors(before: list[str], after: list[str], pieces: list[list[str]]) -> list[str]:
    """Names of the tensors in pieces whose checksum changed between `before` and `after`.

    `pieces[i]` lists the tensor names of piece i."""
    out: list[str] = []
    for i, (a, b) in enumerate(zip(before, after, strict=True)):
        if a != b:
            out.extend(n for n in pieces[i] if n not in out)
    return out
