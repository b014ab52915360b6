"""vLLM's compile cache through the swarm: fetched before vLLM compiles, published once it is complete.

After its weights arrive, vLLM compiles the model (torch.compile: Dynamo, Inductor, Triton kernels) and
captures CUDA graphs; the compile artifacts land under `$VLLM_CACHE_ROOT/torch_compile_cache` (default
`~/.cache/vllm`, or `$XDG_CACHE_HOME/vllm`), and a later start with the same configuration loads them
instead of compiling. This module carries that directory between instances, through swarm.dircache:

- **Fetch** (`CacheFetch`, started by the loader at the start of `load_model`, in a thread beside the
  weights' fetch, joined before `load_model` returns, so before vLLM compiles): look for a publisher of
  this rank's cache key for `compile_cache_timeout_s`, fetch the archive (at most `compile_cache_max`
  bytes, every piece verified like weight pieces, the whole against the index's SHA-256), and install it
  under this instance's `torch_compile_cache` without overwriting anything there. Nothing published,
  too large, or failing: one `swarm:` line, and vLLM compiles as it would have. A fetched cache is
  served onward from then on.
- **Publish** (`CacheWatcher`, a thread started after `load_model` when nothing was fetched): the files
  that appear under `torch_compile_cache` after the load began are this instance's compile. Once an end
  marker is among them (the AOT artifact `rank_<r>_<dp>/model` that vLLM >= 0.28 writes when its AOT
  compile is done, or `vllm_compile_cache.py` that the Inductor backend writes after the last graph),
  and no file has appeared or changed for QUIET_S, they are packed and published. vLLM writes both
  markers at the end of compilation, before CUDA graph capture; the quiet period lets the writes of
  compile threads settle. A watcher gives up after MAX_WATCH_S.

The key. vLLM names its cache directory after a hash of its environment, its config, the traced source
code and the compiler; the code hash is known only after Dynamo traced the model, i.e. after the loader
returns, and the rest is computed by private modules (vllm.envs, vllm.compilation), which the loader
does not import (tests/unit/test_vllm_api_surface.py). So the swarm carries the directories that vLLM
named itself, and vLLM decides whether one is its own: a carried directory with another hash is simply
not used (and vLLM compiles). The swarm-side key only keeps apart what could not match anyway: vLLM's
version and `VllmConfig.compute_hash()` (public; the model path, dtype, parallel and compilation
config), the torch version, the device (name and capability of a GPU), and the weights' swarm key
(model identity, dtype, quantization, parallel layout and rank). Note: vLLM's config hash includes the
model path as given, so instances share a compile cache only when they name the model by the same path.

Trust: a compile cache is code that vLLM runs (Inductor's compiled kernels, Python wrappers, pickled
graphs), not data: a member that may publish one may run code in every instance that loads it. So the
cache travels only in a swarm with a cluster token (authenticated members: SWARM_TOKEN_FILE); in an open
swarm it is neither fetched nor published, and the log says so once.

Limits: an instance that loaded its own cache from disk (nothing new written) publishes nothing; one
that set `compilation_config.cache_dir` is not carried (logged); with `--enforce-eager` (compilation mode
NONE) there is nothing to carry.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import torch

from swarm import dircache
from swarm.errors import SwarmError

logger = logging.getLogger("vllm.swarm")

#: seconds without a new or changed file before a complete cache is published
QUIET_S = 3.0
#: how long a watcher waits for vLLM to finish compiling before giving up
MAX_WATCH_S = 3600.0
POLL_S = 0.5
#: at most this long for the archive itself (the index is looked for `compile_cache_timeout_s`)
FETCH_DEADLINE_S = 300.0
MARKERS = ("vllm_compile_cache.py",)
OPEN_SWARM = (
    "the swarm is open (no token): a compile cache is code that vLLM runs, so it travels only between "
    "authenticated members; set SWARM_TOKEN_FILE (the same secret on every instance) to carry it"
)


def cache_root(env: dict[str, str] | None = None) -> Path:
    """vLLM's `torch_compile_cache` directory (as vllm.envs computes VLLM_CACHE_ROOT)."""
    env = dict(os.environ) if env is None else env
    base = env.get("VLLM_CACHE_ROOT") or os.path.join(
        env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "vllm"
    )
    return Path(os.path.expanduser(base)) / "torch_compile_cache"


def compiles(vllm_config: Any) -> str | None:
    """None when vLLM will compile into the default cache; else why the cache is not carried."""
    cc = getattr(vllm_config, "compilation_config", None)
    mode = getattr(cc, "mode", None)
    if mode is None:
        mode = getattr(cc, "level", None)
    eager = getattr(getattr(vllm_config, "model_config", None), "enforce_eager", False)
    if eager is True or (mode is not None and int(mode) == 0):
        return "vLLM does not compile (compilation mode NONE, e.g. --enforce-eager)"
    cache_dir = getattr(cc, "cache_dir", "")
    if cache_dir:
        return f"compilation_config.cache_dir is set ({cache_dir}); only the default cache is carried"
    if os.environ.get("VLLM_DISABLE_COMPILE_CACHE", "0") not in ("", "0"):
        return "VLLM_DISABLE_COMPILE_CACHE is set"
    return None


def rank_dir(vllm_config: Any) -> str:
    """The `rank_<r>_<dp>` directory name vLLM gives this worker's artifacts."""
    pc = getattr(vllm_config, "parallel_config", None)
    dp = getattr(pc, "data_parallel_index", None)
    if dp is None:
        dp = getattr(pc, "data_parallel_rank", 0)
    return f"rank_{getattr(pc, 'rank', 0)}_{dp}"


def cache_key(vllm_config: Any, weights_key_digest: str) -> str:
    """The swarm-side key (see the module docstring): 16 hex characters."""
    try:
        config_hash = str(vllm_config.compute_hash())
    except Exception as e:  # a config vLLM cannot hash: key on the rest, vLLM still checks its own hash
        config_hash = f"unhashable:{type(e).__name__}"
    if torch.cuda.is_available():
        dev = torch.cuda.current_device()
        device = f"{torch.cuda.get_device_name(dev)}:{torch.cuda.get_device_capability(dev)}"
    else:
        device = "cpu"
    from vllm_plugin import compat

    parts = [compat.engine_version(), torch.__version__, config_hash, device, weights_key_digest]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def cache_name(key: str) -> str:
    return f"compile-cache/{key}"


def _mine(path: str, rank: str) -> bool:
    """Whether `path` is this rank's or shared (not under another rank's `rank_*` directory)."""
    return not any(p.startswith("rank_") and p != rank for p in path.split("/")[:-1])


def complete(files: list[str], rank: str) -> bool:
    """Whether vLLM's end-of-compile marker for this rank is among `files`."""
    for f in files:
        parts = f.split("/")
        if parts[-1] in MARKERS or (parts[-1] == "model" and len(parts) >= 2 and parts[-2] == rank):
            return True
    return False


class CacheFetch:
    """Looks for this rank's compile cache in a thread; `join()` installs it (or says why not)."""

    def __init__(self, root: Path, name: str, node_config: Any, *, max_bytes: int, timeout_s: float) -> None:
        self.root, self.name = root, name
        self.max_bytes, self.timeout_s = max_bytes, timeout_s
        self.config = node_config
        self.seed: dircache.DirSeed | None = None
        self.blob: bytes | None = None
        self.error: str | None = None
        self.seconds = 0.0
        self._thread = threading.Thread(target=self._run, name="swarm-compile-cache", daemon=True)

    def start(self) -> CacheFetch:
        self._thread.start()
        return self

    def _run(self) -> None:
        from swarm.errors import ManifestMismatchError, NoSeedError

        if not self.config.token:
            self.error = OPEN_SWARM
            return
        t0 = time.perf_counter()
        try:
            self.blob, self.seed = dircache.fetch(
                self.name, "", self.config, max_bytes=self.max_bytes, timeout_s=self.timeout_s
            )
        except (NoSeedError, ManifestMismatchError) as e:
            self.error = f"none published for this model and layout ({e.message})"
        except (SwarmError, OSError, RuntimeError) as e:
            self.error = f"fetching it failed ({type(e).__name__}: {e})"
        except Exception as e:  # never fail a load for the cache
            self.error = f"fetching it failed unexpectedly ({type(e).__name__}: {e})"
        self.seconds = time.perf_counter() - t0

    def join(self) -> dircache.DirSeed | None:
        """Wait for the fetch (bounded by its own timeouts) and install what came; the seed that now
        serves it onward, or None (one line logged either way)."""
        self._thread.join(self.timeout_s + FETCH_DEADLINE_S + 30.0)
        if self._thread.is_alive():
            self.error = "fetching it did not end in time"
        if self.blob is not None and self.error is None:
            try:
                entries = dircache.unpack(self.blob)
                installed, skipped = dircache.install(entries, self.root)
            except (SwarmError, OSError) as e:
                self.error = f"installing it failed ({type(e).__name__}: {e})"
            else:
                logger.info(
                    "swarm: compile cache %s from the swarm: %d files (%d already here), %.1f MB in %.2f s, "
                    "into %s; vLLM uses it if its own cache hash matches",
                    self.name,
                    installed,
                    skipped,
                    len(self.blob) / 1e6,
                    self.seconds,
                    self.root,
                )
                return self.seed
        if self.seed is not None:
            self.seed.close()
        logger.info("swarm: compile cache %s not carried: %s; vLLM compiles", self.name, self.error)
        return None


class CacheWatcher:
    """Publishes this instance's compile cache once vLLM has written it (see the module docstring)."""

    def __init__(
        self, root: Path, before: set[str], rank: str, name: str, node_config: Any, *, max_bytes: int
    ) -> None:
        self.root, self.before, self.rank, self.name = root, before, rank, name
        self.config, self.max_bytes = node_config, max_bytes
        self.seed: dircache.DirSeed | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="swarm-compile-cache-watch", daemon=True)

    def start(self) -> CacheWatcher:
        if not self.config.token:  # CacheFetch has said why already
            return self
        self._thread.start()
        return self

    def new_files(self) -> dict[str, tuple[int, int]]:
        """This instance's new files: relative path -> (size, mtime_ns)."""
        if not self.root.is_dir():
            return {}
        out = {}
        for rel in dircache.list_files(self.root):
            if rel not in self.before and _mine(rel, self.rank):
                try:
                    st = (self.root / rel).stat()
                except OSError:
                    continue
                out[rel] = (st.st_size, st.st_mtime_ns)
        return out

    def _run(self) -> None:
        deadline = time.monotonic() + MAX_WATCH_S
        last: dict[str, tuple[int, int]] = {}
        quiet_since = time.monotonic()
        while not self._stop.wait(POLL_S):
            if time.monotonic() > deadline:
                logger.info("swarm: compile cache %s: vLLM wrote no complete cache; not published", self.name)
                return
            files = self.new_files()
            if files != last:
                last, quiet_since = files, time.monotonic()
                continue
            if files and complete(list(files), self.rank) and time.monotonic() - quiet_since >= QUIET_S:
                self._publish(sorted(files))
                return

    def _publish(self, files: list[str]) -> None:
        try:
            blob = dircache.pack(self.root, files, max_bytes=self.max_bytes)
            with self._lock:
                if self._stop.is_set():
                    return
                self.seed = dircache.publish(self.name, "", blob, self.config)
        except (SwarmError, OSError, RuntimeError) as e:
            logger.warning("swarm: compile cache %s not published: %s: %s", self.name, type(e).__name__, e)
            return
        logger.info(
            "swarm: publishing this instance's compile cache as %s: %d files, %.1f MB",
            self.name,
            len(files),
            len(blob) / 1e6,
        )

    def close(self) -> None:
        with self._lock:
            self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(30.0)
        if self.seed is not None:
            self.seed.close()

    def status(self) -> dict[str, Any]:
        return {"compile_cache": self.name, "published": self.seed is not None}


def snapshot(root: Path) -> set[str]:
    """The files under `root` now (those are not this instance's compile)."""
    return set(dircache.list_files(root)) if root.is_dir() else set()
