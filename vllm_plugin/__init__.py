"""The vLLM adapter: registers the `swarm` load format. The only package that imports vllm.

`register()` is vLLM's `vllm.general_plugins` entry point: vLLM calls it in every process it starts (API
server, engine core, each worker), so it must be cheap and safe to call many times. vLLM is imported
inside it, never at module import, so `vllm_plugin.tinymodel` and friends work without vLLM.
"""

LOAD_FORMAT = "swarm"
_registered = False


def register() -> None:
    """Register `SwarmModelLoader` under `--load-format swarm` (once per process: vLLM warns when a load
    format is registered again)."""
    global _registered
    if _registered:
        return
    from vllm.model_executor.model_loader import register_model_loader

    from vllm_plugin.loader import SwarmModelLoader

    register_model_loader(LOAD_FORMAT)(SwarmModelLoader)
    _registered = True
