"""vllm_plugin without a vLLM server: options, the swarmed tensors of a module, the swarm key, the tiny
model maker. (The loader with real vLLM servers: tests/vllm.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from swarm.errors import ConfigError, ManifestError
from swarm.manifest import Manifest
from vllm_plugin import identity
from vllm_plugin.options import auto_piece_size, parse_options
from vllm_plugin.tensors import changed_tensors, replaced_bytes, swarm_tensors
from vllm_plugin.tinymodel import WEIGHT_PATTERNS, copy_without_weights, make_tiny_model

# --- options ----------------------------------------------------------------------------------------


def test_options_defaults_env_and_json_precedence() -> None:
    o = parse_options({}, env={})
    assert o.node == {} and o.fallback and o.serve and o.verify and o.model_id is None
    env = {
        "SWARM_PEERS": "10.0.0.1:5000",
        "SWARM_DISCOVERY_TIMEOUT": "7",
        "SWARM_MDNS": "off",
        "SWARM_FALLBACK": "0",
    }
    o = parse_options({}, env=env)
    assert o.node == {"peers": "10.0.0.1:5000", "discovery_timeout_s": 7.0, "mdns": False}
    assert o.fallback is False
    o = parse_options({"peers": ["a:1", "b:2"], "discovery_timeout_s": 2, "piece_size": "1MiB"}, env=env)
    assert o.node["peers"] == "a:1,b:2" and o.node["discovery_timeout_s"] == 2.0
    assert o.node["piece_size"] == 1 << 20 and o.piece_size_given


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"discovery_timeout": 3}, "unknown option(s) 'discovery_timeout'"),
        ({"piece_size": "lots"}, "--model-loader-extra-config piece_size='lots' is not valid: not a size"),
        ({"piece_size": 0}, "piece_size=0 is not valid: less than 1 KiB"),
        ({"piece_size": 1.5}, "not a whole number of bytes"),
        ({"deadline_s": -1}, "expected a positive number of seconds"),
        ({"mdns": "yes"}, "expected true or false"),
        ({"control_port": "5000"}, "control_port='5000' is not valid: not an integer"),
        ({"control_port": 1.5}, "control_port=1.5 is not valid: not an integer"),
        ({"peers": []}, "host:port"),
        ({"peers": "10.0.0.1"}, "missing ':port'"),  # issue 13: vLLM started, then did not seed
        ({"peers": ["dns:svc.ns.svc:0"]}, "port '0' is not a number in 1..65535"),
        ({"model_id": ""}, "model_id='' is not valid: empty"),
        ({"token": 42}, "token=<hidden> is not valid"),
        ({"rate_cap": "2GB"}, None),
        ({"peers": ["dns:swarm.default.svc.cluster.local", "dns-srv:_swarm._tcp.swarm"]}, None),
    ],
)
def test_bad_options_fail_with_a_clear_message(extra: dict[str, object], message: str | None) -> None:
    if message is None:  # accepted
        assert parse_options(extra, env={}).node
        return
    with pytest.raises(ConfigError) as e:
        parse_options(extra, env={})
    assert message in str(e.value)


def test_compile_cache_options() -> None:
    o = parse_options({}, env={})
    assert o.compile_cache and o.compile_cache_timeout_s == 3.0 and o.compile_cache_max == 2 * 10**9
    o = parse_options({"compile_cache_max": "500MiB"}, env={"SWARM_COMPILE_CACHE": "0"})
    assert not o.compile_cache and o.compile_cache_max == 500 << 20 and o.node == {}
    with pytest.raises(ConfigError, match="SWARM_COMPILE_CACHE_TIMEOUT='-1' is not valid"):
        parse_options({}, env={"SWARM_COMPILE_CACHE_TIMEOUT": "-1"})
    with pytest.raises(ConfigError, match="compile_cache_max='lots' is not valid: not a size"):
        parse_options({"compile_cache_max": "lots"}, env={})


def test_bad_environment_fails_with_the_variable_named() -> None:
    with pytest.raises(ConfigError, match="SWARM_STALL_TIMEOUT='soon'"):
        parse_options({}, env={"SWARM_STALL_TIMEOUT": "soon"})
    with pytest.raises(ConfigError, match="SWARM_SERVE='maybe'"):
        parse_options({}, env={"SWARM_SERVE": "maybe"})


def test_node_overrides_of_a_rank() -> None:
    o = parse_options({"control_port": 47000, "metrics_port": 9400}, env={})
    values = o.node_overrides(rank=1, piece_size=1 << 20)
    assert values == {"control_port": 47000, "metrics_port": 9400, "port_offset": 1, "piece_size": 1 << 20}
    from swarm.node import NodeConfig

    cfg = NodeConfig.from_env(env={}, model_name="m", **values)
    assert (cfg.control_port, cfg.port_offset) == (47000, 1)


def test_disk_options_pass_through() -> None:
    o = parse_options({"enable_multithread_load": True, "num_threads": 4}, env={})
    assert o.disk == {"enable_multithread_load": True, "num_threads": 4}


def test_auto_piece_size() -> None:
    assert auto_piece_size(100 << 30) == 64 << 20
    assert auto_piece_size(5_000_000) == 256 << 10  # a tiny test model: ~20 pieces
    assert auto_piece_size(1000) == 64 << 10
    for total in (1 << 20, 123_456_789, 3 << 30):
        size = auto_piece_size(total)
        assert size & (size - 1) == 0 and (size == 64 << 10 or total >= 16 * size)


# --- swarmed tensors --------------------------------------------------------------------------------


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight  # tied: one Parameter under two names
        self.register_buffer("scale", torch.ones(4))
        self.register_buffer("cache", torch.zeros(8), persistent=False)
        self.register_buffer("nothing", torch.empty(0))


def test_swarm_tensors_order_ties_and_buffers() -> None:
    m = Tied()
    st = swarm_tensors(m)
    assert list(st.tensors) == ["embed.weight", "proj.weight", "proj.bias", "scale"]
    assert st.aliases == {"head.weight": "embed.weight"}
    assert st.empty == ["nothing"]
    # views share the model's memory: writing them writes the model
    st.tensors["proj.bias"].fill_(3.0)
    assert torch.equal(m.proj.bias.detach(), torch.full((4,), 3.0))
    assert st.tensors["embed.weight"].data_ptr() == m.head.weight.data_ptr()
    Manifest.from_tensors(st.tensors, 64)  # a valid manifest


def test_swarm_tensors_two_parameters_viewing_one_memory() -> None:
    m = nn.Module()
    base = torch.zeros(4, 4)
    m.a = nn.Parameter(base, requires_grad=False)
    m.b = nn.Parameter(base, requires_grad=False)  # another Parameter object, same memory
    st = swarm_tensors(m)
    assert list(st.tensors) == ["a"] and st.aliases == {"b": "a"}


def test_swarm_tensors_refuses_meta_and_non_contiguous() -> None:
    with torch.device("meta"):
        meta = nn.Linear(2, 2)
    with pytest.raises(ManifestError, match="meta device"):
        swarm_tensors(meta)
    m = nn.Module()
    m.w = nn.Parameter(torch.zeros(4, 6).t(), requires_grad=False)
    with pytest.raises(ManifestError, match="not contiguous"):
        swarm_tensors(m)


def test_replaced_bytes_counts_what_post_processing_swapped_out() -> None:
    m = nn.Linear(8, 8)
    st = swarm_tensors(m)
    assert replaced_bytes(m, st) == 0
    m.weight = nn.Parameter(torch.empty(0), requires_grad=False)  # like vLLM's CPU oneDNN packing
    assert replaced_bytes(m, st) == 8 * 8 * 4


def test_changed_tensors() -> None:
    pieces = [["a"], ["a", "b"], ["c"]]
    assert changed_tensors(["1", "2", "3"], ["1", "x", "3"], pieces) == ["a", "b"]
    assert changed_tensors(["1", "2", "3"], ["1", "2", "3"], pieces) == []


# --- swarm key --------------------------------------------------------------------------------------


def _model_dir(tmp: Path, name: str, config: dict[str, object]) -> Path:
    d = tmp / name
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(config))
    return d


def test_identity_name_and_config_digest(tmp_path: Path) -> None:
    a = _model_dir(tmp_path / "x", "llama", {"hidden_size": 8, "vocab_size": 10})
    # same name, same config formatted differently, in another directory: same identity
    b = tmp_path / "y" / "llama"
    b.mkdir(parents=True)
    (b / "config.json").write_text('{\n  "vocab_size": 10,\n  "hidden_size": 8\n}')
    assert identity.model_identity(str(a)) == identity.model_identity(str(b))
    assert identity.model_identity(str(a)).startswith("llama@")
    # config, revision, overrides and the name each change it
    c = _model_dir(tmp_path / "z", "llama", {"hidden_size": 16, "vocab_size": 10})
    assert identity.model_identity(str(c)) != identity.model_identity(str(a))
    assert identity.model_identity(str(a), revision="v2") != identity.model_identity(str(a))
    assert identity.model_identity(str(a), hf_overrides={"x": 1}) != identity.model_identity(str(a))
    d = _model_dir(tmp_path / "w", "llama-finetune", {"hidden_size": 8, "vocab_size": 10})
    assert identity.model_identity(str(d)) != identity.model_identity(str(a))
    # model_id replaces the name, not the config digest
    assert identity.model_identity(str(d), model_id="org/m") == identity.model_identity(
        str(a), model_id="org/m"
    )
    assert identity.model_identity(str(a), model_id="org/m").startswith("org/m@")


def test_identity_ignores_weight_files(tmp_path: Path) -> None:
    full = make_tiny_model(tmp_path / "full" / "tiny", layers=1, hidden=64, vocab_size=128)
    leech = copy_without_weights(full, tmp_path / "leech" / "tiny")
    assert identity.model_identity(str(full)) == identity.model_identity(str(leech))


def test_swarm_key_fields() -> None:
    key = identity.make_key(
        identity="m@0123",
        dtype="bfloat16",
        quantization=identity.quantization_text("fp8", {"activation_scheme": "dynamic"}),
        engine="vllm-0.32.0",
        tp_size=2,
        tp_rank=1,
        pp_size=1,
        pp_rank=0,
    )
    assert key.rank == "tp1/2,pp0/1"
    assert key.quantization.startswith("fp8:") and key.extra == "stage=loaded"
    assert identity.quantization_text(None) == ""
    other = identity.make_key(
        identity="m@0123",
        dtype="bfloat16",
        quantization=key.quantization,
        engine="vllm-0.32.0",
        tp_size=2,
        tp_rank=0,
        pp_size=1,
        pp_rank=0,
    )
    assert other.digest != key.digest


# --- tiny models ------------------------------------------------------------------------------------


def test_tiny_models_are_deterministic_and_tied(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    a = make_tiny_model(tmp_path / "a", "llama", layers=1, hidden=64, vocab_size=128)
    b = make_tiny_model(tmp_path / "b", "llama", layers=1, hidden=64, vocab_size=128)
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert "lm_head.weight" in wa
    q = make_tiny_model(tmp_path / "q", "qwen2", layers=1, hidden=64, vocab_size=128)
    wq = load_file(q / "model.safetensors")
    assert "lm_head.weight" not in wq and "model.layers.0.self_attn.q_proj.bias" in wq
    assert json.loads((q / "config.json").read_text())["tie_word_embeddings"] is True
    leech = copy_without_weights(q, tmp_path / "leech")
    assert not [f for p in WEIGHT_PATTERNS for f in leech.glob(p)]
    assert (leech / "tokenizer.json").exists() and (leech / "config.json").exists()


# --- logs -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("level", "shown"), [("INFO", True), ("warning", False)])
def test_swarm_logs_carry_the_prefix_and_follow_the_level(level: str, shown: bool) -> None:
    import io
    import logging

    from vllm_plugin.logs import route_swarm_logs

    out = io.StringIO()
    target = logging.StreamHandler(out)
    target.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    swarm_log = logging.getLogger("swarm")
    saved = (swarm_log.level, swarm_log.propagate)
    installed = route_swarm_logs([target], level)
    try:
        assert installed and route_swarm_logs([target], level) == []  # idempotent
        logging.getLogger("swarm.node").info("node %s listening", "abc")
        logging.getLogger("swarm.discovery").warning("swarm: already prefixed")
        lines = out.getvalue().splitlines()
        expected = ["INFO swarm: node abc listening"] if shown else []
        assert lines == [*expected, "WARNING swarm: already prefixed"]
    finally:
        for h in installed:
            swarm_log.removeHandler(h)
        swarm_log.setLevel(saved[0])
        swarm_log.propagate = saved[1]
