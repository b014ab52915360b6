"""The loader inside vLLM without a server: registration and start-up validation of options."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.vllm


def test_register_is_idempotent_and_vllm_finds_the_loader() -> None:
    from vllm.config.load import LoadConfig
    from vllm.model_executor.model_loader import get_model_loader

    import vllm_plugin
    from vllm_plugin.loader import SwarmModelLoader

    for _ in range(3):
        vllm_plugin.register()
    loopback = {"host": "127.0.0.1"}  # no token: an open swarm is accepted on loopback only
    loader = get_model_loader(LoadConfig(load_format="swarm", model_loader_extra_config=loopback))
    assert type(loader) is SwarmModelLoader


def test_an_open_swarm_beyond_loopback_is_refused_at_start() -> None:
    from vllm.config.load import LoadConfig
    from vllm.model_executor.model_loader import get_model_loader

    import vllm_plugin
    from swarm.errors import ConfigError

    vllm_plugin.register()
    with pytest.raises(ConfigError, match="the swarm is open"):
        get_model_loader(LoadConfig(load_format="swarm", model_loader_extra_config={}))
    loader = get_model_loader(LoadConfig(load_format="swarm", model_loader_extra_config={"allow_open": True}))
    assert loader.options.node["allow_open"] is True


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"peer": "h:1"}, "unknown option(s) 'peer'"),
        ({"transport": "carrier-pigeon"}, "unknown transport 'carrier-pigeon'"),
        ({"stall_timeout_s": "30"}, "expected a positive number of seconds"),
    ],
)
def test_bad_options_fail_when_vllm_creates_the_loader(extra: dict[str, object], message: str) -> None:
    from vllm.config.load import LoadConfig

    import vllm_plugin
    from swarm.errors import ConfigError

    vllm_plugin.register()
    from vllm.model_executor.model_loader import get_model_loader

    with pytest.raises(ConfigError) as e:
        get_model_loader(LoadConfig(load_format="swarm", model_loader_extra_config=extra))
    assert message in str(e.value)
