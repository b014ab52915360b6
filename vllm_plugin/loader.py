"""`--load-format swarm`: a vLLM model loader that pulls a rank's weights from the instances already
running, and serves them onward once it holds them.

Built on vLLM's stable loader API only (vllm_plugin.compat names it, and the few version differences):
the base class's `load_model` builds the model, calls our `load_weights`, and post-processes, on every
supported release (0.24 to 0.33). Per worker rank (docs/loader.md has the long form):

1. `load_model` (wrapping the base class's) notes the `VllmConfig` for this load, then lets the base class
   build the model on the target device without weights.
2. `load_weights`, called by the base class on that model: derive what this rank swarms
   (vllm_plugin.tensors: parameters and persistent buffers as loaded, before post-processing, each tensor
   once, tied names as aliases) and its swarm key (vllm_plugin.identity: model identity, dtype,
   quantization, vLLM version, TP/PP layout and rank); start a swarm node on those tensors and fetch: the
   pieces land straight in the model's parameters, each verified against its checksum. If no seed
   answers within the discovery time, every seed found holds another manifest, the swarm stalls past its
   deadline, or the node cannot start, `_fallback` logs why and loads from disk exactly as vLLM's
   `DefaultModelLoader` does, into the same tensors; without weight files on disk it fails with an error
   that says so.
3. The base class post-processes (`process_weights_after_loading`); back in `load_model` we check that
   post-processing left the swarmed bytes as they were, then mark the node complete: it serves every
   piece from its background threads until the process exits (vllm_plugin.members closes it then).

Beside the weights, `load_model` carries vLLM's compile cache (vllm_plugin.compile_cache): it starts
looking for a published one as it begins, installs it before it returns (so before vLLM compiles), and
otherwise watches for this instance's own compile to publish it.

A `load_weights` call outside `load_model` (vLLM's in-place weight reload) loads from disk, as the
default loader would: the swarm only fills a model that `load_model` is building.

Why the loaded stage and not the post-processed one: post-processing is platform specific and not always
a tensor at all (on CPU it packs every linear weight into a oneDNN handle and empties the parameter), so
the post-processed state cannot be predicted on a leecher before it has the weights, nor served as bytes.
The loaded state is what every instance of a key has in common. The price: where post-processing
replaces a tensor instead of updating it in place, a serving rank keeps the loaded copy alive to serve it
(logged at start-up as "keeps N MB"); on GPUs, unquantized models replace nothing.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn
from vllm.logger import init_logger

from swarm import metrics
from swarm.errors import ConfigError, SwarmError
from swarm.manifest import Manifest, SwarmKey, dtype_name, piece_checksums
from vllm_plugin import compat, compile_cache, identity, members
from vllm_plugin.logs import route_swarm_logs
from vllm_plugin.options import LoaderOptions, auto_piece_size, check_open_swarm, parse_options
from vllm_plugin.tensors import SwarmTensors, changed_tensors, replaced_bytes, swarm_tensors

logger = init_logger("vllm.swarm")

LAST_LOAD = members.LAST_LOAD


class WeightsMissingError(RuntimeError):
    """The swarm could not provide the weights and the model directory has none to fall back to."""


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


@dataclass
class _Fill:
    """What `load_weights` left for `load_model` to finish after post-processing."""

    node: Any
    swarmed: SwarmTensors
    before: list[str] | None


@dataclass
class _CompileCache:
    """This load's compile cache: the fetch under way, and what publishing needs if nothing comes."""

    fetch: compile_cache.CacheFetch
    root: Path
    before: set[str]
    rank: str
    name: str
    config: Any
    options: LoaderOptions

    def finish(self) -> None:
        """Install the fetched cache (served onward from then on), or watch for vLLM's own to publish."""
        seed = self.fetch.join()
        if seed is not None:
            members.add(seed)
        elif self.options.serve:
            watcher = compile_cache.CacheWatcher(
                self.root,
                self.before,
                self.rank,
                self.name,
                self.config,
                max_bytes=self.options.compile_cache_max,
            )
            members.add(watcher.start())

    def abandon(self) -> None:
        seed = self.fetch.join()
        if seed is not None:
            seed.close()


class SwarmModelLoader(compat.BaseModelLoader):  # type: ignore[misc]
    """The `swarm` load format. Options: vllm_plugin.options (also docs/loader.md)."""

    def __init__(self, load_config: Any) -> None:
        super().__init__(load_config)
        extra = load_config.model_loader_extra_config
        if not isinstance(extra, dict):
            raise ConfigError(
                f"--model-loader-extra-config must be a JSON object for --load-format swarm, "
                f"got {type(extra).__name__}"
            )
        self.options: LoaderOptions = parse_options(extra)
        # Validate the node options now (start-up), not when the first fetch needs them, and refuse an
        # open swarm beyond loopback unless allowed.
        check_open_swarm(self._node_config(model_name="check", rank=0))
        version = compat.engine_version()
        if not compat.supported(version):
            logger.warning(
                "swarm: vLLM %s is outside the tested range %s to %s; the loader uses only vLLM's "
                "stable loader API, but report problems with this version",
                version,
                *compat.SUPPORTED,
            )
        self._vllm_config: Any = None
        self._fill: _Fill | None = None
        self._timer = metrics.LoadTimer(model="", rank="")

    # --- configuration ----------------------------------------------------------------------------

    def _node_config(self, *, model_name: str, rank: int, piece_size: int | None = None) -> Any:
        from swarm.node import NodeConfig

        # rank r listens on control_port + r (and serves metrics on metrics_port + r)
        overrides = self.options.node_overrides(rank=rank, piece_size=piece_size)
        return NodeConfig.from_env(env={}, model_name=model_name, **overrides)

    def _disk_loader(self) -> Any:
        config = dataclasses.replace(
            self.load_config, load_format="auto", model_loader_extra_config=dict(self.options.disk)
        )
        return compat.DefaultModelLoader(config)

    # --- the stable loader API ----------------------------------------------------------------------

    def download_model(self, model_config: Any) -> None:
        """Nothing to download ahead of time: a leecher needs no weight files (the disk fallback looks
        for them only when it is taken)."""

    def load_model(self, vllm_config: Any, model_config: Any, *args: Any, **kwargs: Any) -> nn.Module:
        """The base class's load_model, with the swarm's start (load_weights) and finish around it."""
        route_swarm_logs()
        self._vllm_config, self._fill = vllm_config, None
        cache = self._start_compile_cache(vllm_config, model_config)
        try:
            model = super().load_model(vllm_config, model_config, *args, **kwargs)
        except BaseException:
            if self._fill is not None:
                members.remove(self._fill.node)
            if cache is not None:
                cache.abandon()
            raise
        finally:
            self._vllm_config = None
        fill, self._fill = self._fill, None
        if fill is not None:
            self._after_postprocess(model, fill)
        if cache is not None:
            cache.finish()
        return model

    def load_weights(self, model: nn.Module, model_config: Any) -> None:
        """Fill `model`: from the swarm when `load_model` is building it, else (an in-place reload) from
        disk, as the default loader does."""
        if self._vllm_config is None:
            self._disk_loader().load_weights(model, model_config)
            return
        self._fill = self._fill_from_swarm(model, self._vllm_config, model_config)

    # --- the swarm --------------------------------------------------------------------------------

    def swarm_key(self, vllm_config: Any, model_config: Any) -> SwarmKey:
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
            engine=f"vllm-{compat.engine_version()}",
            **compat.rank_layout(vllm_config),
        )

    def _start_compile_cache(self, vllm_config: Any, model_config: Any) -> _CompileCache | None:
        """Start looking for this rank's compile cache (vllm_plugin.compile_cache), unless it is off or
        vLLM will not compile into its default cache. Never fails the load: None, with one line, then."""
        if not self.options.compile_cache:
            return None
        try:
            why = compile_cache.compiles(vllm_config)
            if why is not None:
                logger.info("swarm: compile cache not carried: %s", why)
                return None
            key = self.swarm_key(vllm_config, model_config)
            name = compile_cache.cache_name(compile_cache.cache_key(vllm_config, key.digest))
            config = self._node_config(model_name=name, rank=key.pp_rank * key.tp_size + key.tp_rank)
            config = dataclasses.replace(
                config, deadline_s=min(config.deadline_s, compile_cache.FETCH_DEADLINE_S)
            )
            root = compile_cache.cache_root()
            before = compile_cache.snapshot(root)
            fetch = compile_cache.CacheFetch(
                root,
                name,
                config,
                max_bytes=self.options.compile_cache_max,
                timeout_s=self.options.compile_cache_timeout_s,
            ).start()
        except Exception as e:  # the cache never fails a load
            logger.warning("swarm: compile cache not carried: %s: %s", type(e).__name__, e)
            return None
        return _CompileCache(
            fetch, root, before, compile_cache.rank_dir(vllm_config), name, config, self.options
        )

    def _fill_from_swarm(self, model: nn.Module, vllm_config: Any, model_config: Any) -> _Fill | None:
        """Put the weights into `model`: from the swarm, else from disk. Returns what `load_model` must
        finish after post-processing, or None when this rank will not serve."""
        LAST_LOAD.clear()
        key = self.swarm_key(vllm_config, model_config)
        rank = key.pp_rank * key.tp_size + key.tp_rank
        name = identity.model_name(model_config.model, self.options.model_id)
        self._timer = metrics.LoadTimer(model=name, rank=key.rank)
        try:
            swarmed = swarm_tensors(model)
            piece_size = auto_piece_size(swarmed.total_bytes)
            config = self._node_config(model_name=name, rank=rank, piece_size=piece_size)
            manifest = Manifest.from_tensors(swarmed.tensors, config.piece_size)
        except ConfigError:
            raise
        except SwarmError as e:
            self._fallback(
                model, model_config, f"this model cannot be swarmed ({e})", "not_swarmable", node=None
            )
            return None

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
            self._fallback(model, model_config, reason, metrics.fallback_reason(e), node=None)
            return None
        members.add(node)
        failed = self._fetch(node, manifest)
        if failed is not None and not self._fallback(
            model, model_config, *failed, node=node, swarmed=swarmed
        ):
            return None
        before = piece_checksums(manifest, swarmed.tensors) if self.options.verify else None
        return _Fill(node, swarmed, before)

    def _fallback(
        self,
        model: nn.Module,
        model_config: Any,
        reason: str,
        code: str,
        *,
        node: Any,
        swarmed: SwarmTensors | None = None,
    ) -> bool:
        """The one way to disk: say why, load from disk (or fail when fallback is off), and say whether
        `node` (None when there is none) can serve what was loaded."""
        if not self.options.fallback:
            if node is not None:
                members.remove(node)
            raise RuntimeError(f"--load-format swarm: {reason}, and fallback to disk is off (fallback=false)")
        seeding = node is not None
        logger.warning("swarm: %s; loading from disk %s", reason, "instead" if seeding else "without seeding")
        LAST_LOAD.update(source="disk", reason=reason, seeding=seeding)
        t0 = time.perf_counter()
        try:
            self._load_from_disk(model, model_config, why=reason)
        except BaseException:
            if node is not None:
                members.remove(node)
            raise
        LAST_LOAD["seconds"] = seconds = time.perf_counter() - t0
        self._timer.done("disk", sum(t.numel() * t.element_size() for t in model.state_dict().values()), code)
        if node is None or swarmed is None:
            return False
        moved = [n for n, t in swarmed.tensors.items() if t.data_ptr() != _live_ptr(model, n)]
        if moved:
            logger.warning("swarm: loading replaced tensors %s; not seeding", moved[:5])
            members.remove(node)
            LAST_LOAD["seeding"] = False
            return False
        if self.options.serve:
            node.mark_complete()
            logger.info(
                "swarm: loaded from disk; now seeding %s as %s (the disk load took %.2f s)",
                _fmt_bytes(node.manifest.total_bytes),
                node.key.describe(),
                seconds,
            )
        return True

    def _fetch(self, node: Any, manifest: Manifest) -> tuple[str, str] | None:
        """Fetch every piece; None on success, else why it failed and the metrics' reason code (the caller
        falls back)."""
        from tqdm import tqdm

        from swarm.errors import ManifestMismatchError, NoSeedError, StallError

        bar: Any = None

        def progress(done: int, total: int) -> None:
            nonlocal bar
            # the bar starts with the first bytes, once discovery is over, not at 0% during it
            if bar is None and done > 0 and compat.use_tqdm(self.load_config):
                bar = tqdm(
                    total=manifest.total_bytes,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1000,
                    desc="Loading weights from the swarm",
                    dynamic_ncols=True,
                )
            if bar is not None:
                bar.update(done - bar.n)

        try:
            report = node.fetch(progress=progress)
        except NoSeedError as e:
            return f"no seed found ({e})", metrics.fallback_reason(e)
        except ManifestMismatchError as e:
            return (
                f"refused the seeds found: they hold a different manifest: {e.difference}",
                "manifest_mismatch",
            )
        except StallError as e:
            return f"the swarm stalled ({e}; {len(e.missing)} pieces missing)", "stall"
        except SwarmError as e:
            return f"fetching from the swarm failed ({type(e).__name__}: {e})", metrics.fallback_reason(e)
        finally:
            if bar is not None:
                bar.close()
        self._timer.done("swarm", report.total_bytes)
        per_peer = ", ".join(
            f"{report.peer_label(p)}: {_fmt_bytes(b)}" for p, b in sorted(report.bytes_by_peer.items())
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
            peer_paths=dict(report.peer_paths),
            seconds=report.seconds,
        )
        return None

    def _load_from_disk(self, model: nn.Module, model_config: Any, *, why: str) -> None:
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

    def _after_postprocess(self, model: nn.Module, fill: _Fill) -> None:
        """Post-processing must not change the swarmed bytes in place (they are served as loaded)."""
        node, swarmed, before = fill.node, fill.swarmed, fill.before
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
                members.remove(node)
                LAST_LOAD["seeding"] = False
                return
        if not self.options.serve:
            members.remove(node)
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
