"""The few places where the vLLM releases we support (0.24 to 0.33) differ, each named with its versions.

The loader touches vLLM only through its stable, public loader API:

- `vllm.model_executor.model_loader`: `BaseModelLoader` (constructor taking the `LoadConfig`; the
  abstract `download_model(model_config)` and `load_weights(model, model_config)`; `load_model`, which
  builds the model, calls `load_weights`, and post-processes) and `DefaultModelLoader` (the disk path);
- `vllm.distributed`: the tensor- and pipeline-parallel group accessors, for this rank's layout;
- `vllm.logger.init_logger` and `vllm.__version__`.

No private name is imported anywhere in vllm_plugin: a private import breaks on the next release (vLLM
0.32's `BaseModelLoader.create_model` and `_has_online_quant` do not exist in 0.24 to 0.28).

Differences handled here, with the versions where they were read:

- `BaseModelLoader.load_model(vllm_config, model_config, prefix="")` in 0.24, 0.28 and 0.32 alike (read
  in each); the loader passes on whatever else vLLM gives, so a later keyword does not break it.
- `BaseModelLoader.create_model` exists from 0.32 only (0.24 and 0.28 call `initialize_model` inline):
  the loader never calls it, it lets the base class build the model.
- `LoadConfig.use_tqdm_on_load` exists in 0.24 to 0.32; read with a default of True.
- The expert-parallel data rank (`get_dp_group`) exists from 0.24 on, but only matters with
  `enable_expert_parallel`; read only then.
"""

from __future__ import annotations

from typing import Any

import vllm
from vllm.distributed import (
    get_pp_group,
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
)
from vllm.model_executor.model_loader import BaseModelLoader, DefaultModelLoader

#: The releases this plugin is tested against (README, pyproject).
SUPPORTED = ("0.24", "0.33")

__all__ = ["SUPPORTED", "BaseModelLoader", "DefaultModelLoader", "engine_version", "rank_layout", "use_tqdm"]


def engine_version() -> str:
    return str(vllm.__version__)


def supported(version: str) -> bool:
    """Whether `version` (such as "0.28.0" or "0.32.1.dev3+g0abc") lies in SUPPORTED, by major.minor."""
    try:
        major, minor = (int(x) for x in version.split(".")[:2])
    except ValueError:
        return False
    lo, hi = (tuple(int(x) for x in v.split(".")) for v in SUPPORTED)
    return lo <= (major, minor) <= hi


def rank_layout(vllm_config: Any) -> dict[str, Any]:
    """This worker's place in the parallel layout, from vLLM's process groups (set up before loading)."""
    pp = get_pp_group()
    layout: dict[str, Any] = {
        "tp_size": get_tensor_model_parallel_world_size(),
        "tp_rank": get_tensor_model_parallel_rank(),
        "pp_size": pp.world_size,
        "pp_rank": pp.rank_in_group,
        "expert_layout": "",
    }
    pc = getattr(vllm_config, "parallel_config", None)
    if getattr(pc, "enable_expert_parallel", False):
        from vllm.distributed import get_dp_group

        layout["expert_layout"] = f"dp{get_dp_group().rank_in_group}/{pc.data_parallel_size}"
    return layout


def use_tqdm(load_config: Any) -> bool:
    return bool(getattr(load_config, "use_tqdm_on_load", True))
