"""`--load-format swarm`: a vLLM model loader that pulls a rank's weights from the instances already
running, and serves them onward once it holds them.

Flow of `SwarmModelLoader.load_model`, per worker rank (docs/loader.md has the long form):

1. Build the model on the target device without weights, exactly as vLLM's default loader does
   (`create_model` under the target device; parameters are allocated, not filled).
2. Derive what this rank swarms (vllm_plugin.tensors: parameters and persistent buffers as loaded,
   before post-processing, each tensor once, tied names as aliases) and its swarm key
   (vllm_plugin.identity: model identity, dtype, quantization, vLLM version, TP/PP layout and rank).
3. Start a swarm node on those tensors and fetch: the pieces land straight in the model's parameters,
   each verified against its checksum. If no seed answers within the discovery time, every seed found
   holds another manifest, or the swarm stalls past its deadline, log why and load from disk exactly as
   vLLM's DefaultModelLoader does (`load_weights` into the same tensors); without weight files on disk,
   fail with an error that says so.
4. Run vLLM's post-processing (`process_weights_after_loading`) as after any load, check it left the
   swarmed bytes as they were, then mark the node complete: it serves every piece, from its background
   threads, until the process exits (atexit closes it and withdraws its mDNS record).

Why the loaded stage and not the post-processed one: post-processing is platform specific and not always
a tensor at all (on CPU it packs every linear weight into a oneDNN handle and empties the parameter), so
the post-processed state cannot be predicted on a leecher before it has the weights, nor served as bytes.
The loaded state is what every instance of a key has in common. The price: where post-processing
replaces a tensor instead of updating it in place, a serving rank keeps the loaded copy alive to serve it
(logged at start-up as "keeps N MB"); on GPUs, unquantized models replace nothing.
"""

from __future__ import annotations

import atexit
import dataclasses
import gc
import logging
import multiprocessing.util
import threading
import time
from typing import Any

import torch
from torch import nn
from vllm.config import ModelConfig, VllmConfig
from vllm.config.load import LoadConfig
from vllm.logger import init_logger
from vllm.model_executor.model_loader.base_loader import BaseModelLoader, _has_online_quant
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
from vllm.model_executor.model_loader.utils import process_weights_after_loading
from vllm.utils.torch_utils import set_default_torch_dtype

from swarm.errors import ConfigError, SwarmError
from swarm.manifest import Manifest, SwarmKey, dtype_name, piece_checksums
from vllm_plugin import identity
from vllm_plugin.options import LoaderOptions, auto_piece_size, parse_options
from vllm_plugin.tensors import SwarmTensors, changed_tensors, replaced_bytes, swarm_tensors

logger = init_logger("vllm.swarm")

#: Nodes of this process, kept alive (serving) until exit. Read by tests and `status()`.
NODES: list[Any] = []
_NODES_LOCK = threading.Lock()
#: What the last load_model in this process did (for tests and logs): source, bytes, peers, reason.
LAST_LOAD: dict[str, Any] = {}


class WeightsMissingError(RuntimeError):
    """The swarm could not provide the weights and the model directory has none to fall back to."""


def _route_swarm_logs() -> None:
    """Send the engine's own logs (logger "swarm") through vLLM's handler, so they show in vLLM's log."""
    swarm_log = logging.getLogger("swarm")
    if swarm_log.handlers:
        return
    for handler in logging.getLogger("vllm").handlers:
        swarm_log.addHandler(handler)
    if swarm_log.handlers:
        swarm_log.setLevel(logging.INFO)
        swarm_log.propagate = False


def _close_all_nodes() -> None:
    with _NODES_LOCK:
        nodes = list(NODES)
        NODES.clear()
    if nodes:
        logger.info("swarm: process exit: closing %d node(s), withdrawing their mDNS records", len(nodes))
    for node in nodes:
        try:
            node.close()
        except Exception:  # exit path: report and go on closing the others
            logger.exception("closing swarm node failed")


atexit.register(_close_all_nodes)
# vLLM's worker processes may be forked multiprocessing children, which leave through os._exit without
# running atexit handlers; multiprocessing's own exit hook runs there (and Finalize runs a callback once).
# Neither runs when vLLM shuts down by SIGKILLing its workers (what `vllm serve` does on Ctrl-C today):
# then no mDNS goodbye is sent, the record expires after its TTL, and leechers skip an advert that does
# not answer.
multiprocessing.util.Finalize(None, _close_all_nodes, exitpriority=100)


def _register_node(node: Any) -> None:
    with _NODES_LOCK:
        NODES.append(node)


def _unregister_node(node: Any) -> None:
    with _NODES_LOCK:
        if node in NODES:
            NODES.remove(node)
    node.close()


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


class SwarmModelLoader(BaseModelLoader):
    """The `swarm` load format. Options: vllm_plugin.options (also docs/loader.md)."""

    def __init__(self, load_config: LoadConfig) -> None:
        super().__init__(load_config)
        extra = load_config.model_loader_extra_config
        if not isinstance(extra, dict):
            raise ConfigError(
                f"--model-loader-extra-config must be a JSON object for --load-format swarm, "
                f"got {type(extra).__name__}"
            )
        self.options: LoaderOptions = parse_options(extra)
        # Validate the node options now (start-up), not when the first fetch needs them.
        self._node_config(model_name="check", rank=0)

    # --- configuration ----------------------------------------------------------------------------

    def _node_config(self, *, model_name: str, rank: int, piece_size: int | None = None) -> Any:
        from swarm.node import NodeConfig

        values = dict(self.options.node)
        if piece_size is not None and "piece_size" not in values:
            values["piece_size"] = piece_size
        if values.get("control_port"):
            # One port per rank of this instance: the option names the port of rank 0.
            values["control_port"] = values["control_port"] + rank
        return NodeConfig.from_env(env={}, model_name=model_name, **values)

    def _disk_loader(self) -> DefaultModelLoader:
        config = dataclasses.replace(
            self.load_config, load_format="auto", model_loader_extra_config=dict(self.options.disk)
        )
        return DefaultModelLoader(config)

    # --- BaseModelLoader --------------------------------------------------------------------------

    def download_model(self, model_config: ModelConfig) -> None:
        """Nothing to download ahead of time: a leecher needs no weight files (the disk fallback looks
        for them only when it is taken)."""

    def load_weights(self, model: nn.Module, model_config: ModelConfig) -> None:
        """In-place reload of an already built model: from disk, as the default loader does (the swarm
        fills models at build time, in `load_model`)."""
        self._disk_loader().load_weights(model, model_config)

    def load_model(self, vllm_config: VllmConfig, model_config: ModelConfig, prefix: str = "") -> nn.Module:
        _route_swarm_logs()
        device_config = vllm_config.device_config
        load_device = device_config.device if self.load_config.device is None else self.load_config.device
        target_device = torch.device(load_device)
        with set_default_torch_dtype(model_config.dtype):
            with target_device:
                t0 = time.perf_counter()
                model = self.create_model(vllm_config=vllm_config, model_config=model_config, prefix=prefix)
                logger.info("Initializing model took %.3f seconds", time.perf_counter() - t0)

            node, swarmed, before = self._fill(model, vllm_config, model_config)

            gc.collect()
            torch.accelerator.empty_cache()
            if _has_online_quant(model):
                from vllm.model_executor.model_loader.reload import finalize_layerwise_processing

                finalize_layerwise_processing(model, model_config)
            process_weights_after_loading(model, model_config, target_device)
            if node is not None and swarmed is not None:
                self._after_postprocess(node, model, swarmed, before)
            gc.collect()
            torch.accelerator.empty_cache()
        return model.eval()

    # --- the swarm --------------------------------------------------------------------------------

    def _rank_layout(self, vllm_config: VllmConfig) -> dict[str, Any]:
        from vllm.distributed import (
            get_pp_group,
            get_tensor_model_parallel_rank,
            get_tensor_model_parallel_world_size,
        )

        pc = vllm_config.parallel_config
        layout = {
            "tp_size": get_tensor_model_parallel_world_size(),
            "tp_rank": get_tensor_model_parallel_rank(),
            "pp_size": get_pp_group().world_size,
            "pp_rank": get_pp_group().rank_in_group,
            "expert_layout": "",
        }
        if getattr(pc, "enable_expert_parallel", False):
            from vllm.distributed import get_dp_group

            layout["expert_layout"] = f"dp{get_dp_group().rank_in_group}/{pc.data_parallel_size}"
        return layout

    def swarm_key(self, vllm_config: VllmConfig, model_config: ModelConfig) -> SwarmKey:
        import vllm

        layout = self._rank_layout(vllm_config)
        hf_config = model_config.hf_config
        ident = identity.model_identity(
            model_config.model,
            model_id=self.options.model_id,
            revision=model_config.revision,
            hf_overrides=model_config.hf_overrides,
            hf_config=hf_config.to_dict() if hasattr(hf_config, "to_dict") else None,
        )
        quant = identity.quantization_text(
            model_config.quantization, getattr(hf_config, "quantization_config", None)
        )
        return identity.make_key(
            identity=ident,
            dtype=dtype_name(model_config.dtype),
            quantization=quant,
            engine=f"vllm-{vllm.__version__}",
            **layout,
        )

    def _fill(
        self, model: nn.Module, vllm_config: VllmConfig, model_config: ModelConfig
    ) -> tuple[Any, SwarmTensors | None, list[str] | None]:
        """Put the weights into `model`: from the swarm, else from disk. Returns the node (serving or to
        be marked complete), the swarmed tensors, and their checksums before post-processing."""
        LAST_LOAD.clear()
        key = self.swarm_key(vllm_config, model_config)
        rank = key.pp_rank * key.tp_size + key.tp_rank
        try:
            swarmed = swarm_tensors(model)
            piece_size = auto_piece_size(swarmed.total_bytes)
            name = identity.model_name(model_config.model, self.options.model_id)
            config = self._node_config(model_name=name, rank=rank, piece_size=piece_size)
            manifest = Manifest.from_tensors(swarmed.tensors, config.piece_size)
        except ConfigError:
            raise
        except SwarmError as e:
            logger.warning("swarm: this model cannot be swarmed (%s); loading from disk without seeding", e)
            LAST_LOAD.update(source="disk", reason=str(e), seeding=False)
            self._load_from_disk(model, model_config, why=str(e))
            return None, None, None

        if swarmed.aliases:
            logger.info(
                "swarm: tied tensors (served once): %s",
                ", ".join(f"{a} -> {c}" for a, c in swarmed.aliases.items()),
            )
        logger.info("swarm: rank %s of %s: %s", key.rank, key.describe(), manifest)

        from swarm.node import Node

        node = Node(key, swarmed.tensors, config, complete=False, manifest=manifest)
        try:
            node.start()
        except ConfigError:
            raise
        except (SwarmError, OSError, RuntimeError) as e:  # zmq.ZMQError is a RuntimeError
            reason = f"the swarm node could not start ({type(e).__name__}: {e})"
            if not self.options.fallback:
                raise RuntimeError(f"--load-format swarm: {reason}, and fallback to disk is off") from e
            logger.warning("swarm: %s; loading from disk, not seeding", reason)
            LAST_LOAD.update(source="disk", reason=reason, seeding=False)
            self._load_from_disk(model, model_config, why=reason)
            return None, None, None
        _register_node(node)
        reason = self._fetch(node, manifest)
        if reason is None:
            before = piece_checksums(manifest, swarmed.tensors) if self.options.verify else None
            return node, swarmed, before

        if not self.options.fallback:
            _unregister_node(node)
            raise RuntimeError(f"--load-format swarm: {reason}, and fallback to disk is off (fallback=false)")
        logger.warning("swarm: %s; loading from disk instead", reason)
        try:
            self._load_from_disk(model, model_config, why=reason)
        except BaseException:
            _unregister_node(node)
            raise
        LAST_LOAD.update(source="disk", reason=reason)
        moved = [n for n, t in swarmed.tensors.items() if t.data_ptr() != _live_ptr(model, n)]
        if moved:
            logger.warning("swarm: loading replaced tensors %s; not seeding", moved[:5])
            _unregister_node(node)
            LAST_LOAD["seeding"] = False
            return None, None, None
        before = piece_checksums(manifest, swarmed.tensors) if self.options.verify else None
        if self.options.serve:
            node.mark_complete()
            logger.info(
                "swarm: loaded from disk; now seeding %s as %s",
                _fmt_bytes(manifest.total_bytes),
                key.describe(),
            )
        return node, swarmed, before

    def _fetch(self, node: Any, manifest: Manifest) -> str | None:
        """Fetch every piece; None on success, else why it failed (the caller falls back)."""
        from tqdm import tqdm

        from swarm.errors import ManifestMismatchError, NoSeedError, StallError

        bar = None
        if self.load_config.use_tqdm_on_load:
            bar = tqdm(
                total=manifest.total_bytes,
                unit="B",
                unit_scale=True,
                unit_divisor=1000,
                desc="Loading weights from the swarm",
                dynamic_ncols=True,
            )

        def progress(done: int, total: int) -> None:
            if bar is not None:
                bar.update(done - bar.n)

        try:
            report = node.fetch(progress=progress)
        except NoSeedError as e:
            return f"no seed found ({e})"
        except ManifestMismatchError as e:
            return f"refused the seeds found: they hold a different manifest: {e.difference}"
        except StallError as e:
            return f"the swarm stalled ({e}; {len(e.missing)} pieces missing)"
        except SwarmError as e:
            return f"fetching from the swarm failed ({type(e).__name__}: {e})"
        finally:
            if bar is not None:
                bar.close()
        per_peer = ", ".join(
            f"{report.peer_names.get(p, p)}: {_fmt_bytes(b)}" for p, b in sorted(report.bytes_by_peer.items())
        )
        logger.info(
            "swarm: loaded %s from %d peer(s) in %.2f s (%.3f GB/s), 0 bytes from disk: %s",
            _fmt_bytes(report.total_bytes),
            len(report.bytes_by_peer),
            report.seconds,
            report.total_bytes / report.seconds / 1e9 if report.seconds > 0 else 0.0,
            per_peer,
        )
        LAST_LOAD.update(
            source="swarm",
            bytes=report.total_bytes,
            bytes_by_peer=dict(report.bytes_by_peer),
            peer_names=dict(report.peer_names),
            seconds=report.seconds,
        )
        return None

    def _load_from_disk(self, model: nn.Module, model_config: ModelConfig, *, why: str) -> None:
        disk = self._disk_loader()
        try:
            disk.download_model(model_config)
        except RuntimeError as e:
            if "Cannot find any model weights" not in str(e):
                raise
            raise WeightsMissingError(
                f"--load-format swarm could not load {model_config.model!r}: {why}, and the model "
                f"directory has no weight files to fall back to (*.safetensors, *.bin, *.pt). Start an "
                f"instance that has the weights (same model, dtype, quantization and parallel layout) on "
                f"this LAN first, or put the weights in {model_config.model!r}."
            ) from None
        disk.load_weights(model, model_config)

    def _after_postprocess(
        self, node: Any, model: nn.Module, swarmed: SwarmTensors, before: list[str] | None
    ) -> None:
        """Post-processing must not change the swarmed bytes in place (they are served as loaded)."""
        kept = replaced_bytes(model, swarmed)
        if before is not None:
            manifest = node.manifest
            after = piece_checksums(manifest, swarmed.tensors)
            if after != before:
                names = list(swarmed.tensors)
                pieces = [[names[s.tensor] for s in p.spans] for p in manifest.pieces]
                changed = changed_tensors(before, after, pieces)
                logger.error(
                    "swarm: vLLM's post-processing changed swarmed tensors in place (%s); this rank will "
                    "not serve them",
                    ", ".join(changed[:8]),
                )
                _unregister_node(node)
                LAST_LOAD["seeding"] = False
                return
        if not self.options.serve:
            _unregister_node(node)
            LAST_LOAD["seeding"] = False
            return
        LAST_LOAD["seeding"] = True
        if kept:
            logger.info(
                "swarm: serving %s; keeps %s of loaded tensors that post-processing replaced, to serve them",
                node.key.describe(),
                _fmt_bytes(kept),
            )
        else:
            logger.info("swarm: serving %s", node.key.describe())


def _live_ptr(model: nn.Module, name: str) -> int:
    """data_ptr of the tensor `name` in the model now (0 when gone)."""
    module_name, _, leaf = name.rpartition(".")
    try:
        module = model.get_submodule(module_name) if module_name else model
    except AttributeError:
        return 0
    t = module._parameters.get(leaf)
    if t is None:
        t = module._buffers.get(leaf)
    return 0 if t is None else t.data_ptr()


def status() -> list[dict[str, Any]]:
    """The status of every swarm node of this process."""
    with _NODES_LOCK:
        return [n.status() for n in NODES]
