"""The vLLM adapter: registers the `swarm` load format. The only package that imports vllm."""


def register() -> None:
    """Entry point of vLLM's `vllm.general_plugins` group (the loader lands with its own issue)."""
