"""The vLLM adapter: registers the `swarm` load format. The only package that imports vllm.

`register()` is vLLM's `vllm.general_plugins` entry point: vLLM calls it in every process it starts (API
server, engine core, each worker), so it must be cheap and safe to call many times. vLLM is imported
inside it, never at module import, so `vllm_plugin.tinymodel` and friends work without vLLM.
"""

LOAD_FORMAT = "swarm"


def register() -> None:
    """Register `SwarmModelLoader` under `--load-format swarm` (idempotent)."""
    from vllm.model_executor import model_loader

    from vllm_plugin.loader import SwarmModelLoader

    registry = getattr(model_loader, "_LOAD_FORMAT_TO_MODEL_LOADER", None)
    if registry is not None and registry.get(LOAD_FORMAT) is SwarmModelLoader:
        return  # already registered in this process: vLLM would warn about overwriting it
    model_loader.register_model_loader(LOAD_FORMAT)(SwarmModelLoader)
