"""The swarm key of one vLLM rank: what must match for two ranks' pieces to be interchangeable.

No vLLM import: the loader passes in what it read from vLLM's configuration, so the rules are testable.

Model identity (`SwarmKey.model_id`) = `NAME@DIGEST`:

- NAME: the `model_id` option when given (recommended for fleets, e.g. "meta-llama/Llama-3.1-8B@rev"),
  else the last component of the model path (or the Hugging Face repo id as given);
- DIGEST: SHA-256 over config.json (parsed and re-serialised canonically, so formatting does not
  matter), the revision, and vLLM's `hf_overrides`.

Deliberately NOT in the digest: the checkpoint's safetensors headers and index. A leecher's model
directory holds no weight files, so it cannot read them, and they add nothing the manifest check does not
cover (tensor names, dtypes, shapes): the leecher builds its expected manifest from its own model and
refuses a seed whose manifest differs. What no local check can see is two checkpoints with the same
config and layout but different values (two fine-tunes of one base): NAME is what keeps them apart, so
give fleets a `model_id` naming the exact weights, and keep directory names distinct per checkpoint.

The rest of the key: dtype, quantization (method and a digest of its configuration), the engine
("vllm-<version>"), TP/PP size and rank, and `extra`: the stage swarmed ("loaded": before
post-processing) and, with expert parallelism, the data-parallel layout (it decides which experts a rank
holds).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

from swarm.manifest import SwarmKey

#: What is swarmed: the tensors as loaded, before vLLM's post-processing (see vllm_plugin.tensors).
STAGE = "loaded"


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()


def config_digest(
    model: str,
    revision: str | None = None,
    hf_overrides: Any = None,
    hf_config: Mapping[str, Any] | None = None,
) -> str:
    """16 hex characters over the model's config.json (or `hf_config` when the model is not a local
    directory), the revision and `hf_overrides`."""
    h = hashlib.sha256()
    path = os.path.join(model, "config.json")
    if os.path.isfile(path):
        with open(path, "rb") as f:
            h.update(_canonical(json.loads(f.read())))
    elif hf_config is not None:
        h.update(_canonical(dict(hf_config)))
    else:
        h.update(model.encode())
    h.update(b"\0revision\0" + (revision or "").encode())
    if hf_overrides and not callable(hf_overrides):
        h.update(b"\0hf_overrides\0" + _canonical(hf_overrides))
    return h.hexdigest()[:16]


def model_name(model: str, model_id: str | None = None) -> str:
    """The NAME part: `model_id` when given, else the model directory's last component or the repo id."""
    if model_id:
        return model_id
    if os.path.isdir(model):
        return os.path.basename(os.path.normpath(os.path.abspath(model)))
    return model


def model_identity(
    model: str,
    *,
    model_id: str | None = None,
    revision: str | None = None,
    hf_overrides: Any = None,
    hf_config: Mapping[str, Any] | None = None,
) -> str:
    return f"{model_name(model, model_id)}@{config_digest(model, revision, hf_overrides, hf_config)}"


def quantization_text(method: str | None, config: Any = None) -> str:
    """'' for unquantized models, else the method and 12 hex characters of its configuration."""
    if not method:
        return ""
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    return f"{method}:{hashlib.sha256(_canonical(config)).hexdigest()[:12]}"


def make_key(
    *,
    identity: str,
    dtype: str,
    quantization: str,
    engine: str,
    tp_size: int,
    tp_rank: int,
    pp_size: int,
    pp_rank: int,
    expert_layout: str = "",
) -> SwarmKey:
    extra = f"stage={STAGE}"
    if expert_layout:
        extra += f";ep={expert_layout}"
    return SwarmKey(
        model_id=identity,
        dtype=dtype,
        quantization=quantization,
        engine=engine,
        tp_size=tp_size,
        tp_rank=tp_rank,
        pp_size=pp_size,
        pp_rank=pp_rank,
        extra=extra,
    )
