"""Start and stop real vLLM OpenAI servers (CPU build) for the tests and the demo check.

Every server runs in its own process group and is killed with the group (engine core and workers too),
also when a test fails. The servers run with this checkout first on PYTHONPATH, so vLLM's plugin entry
point (`vllm_plugin:register`) loads the code under test in every vLLM process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.loopback import free_port

ROOT = Path(__file__).resolve().parents[2]


class ServerError(RuntimeError):
    pass


class VllmServer:
    """One `python -m vllm.entrypoints.openai.api_server` process group."""

    def __init__(
        self,
        model: str | Path,
        log_path: Path,
        *,
        swarm: dict[str, Any] | None = None,
        extra_args: list[str] | None = None,
        env: dict[str, str] | None = None,
        name: str = "vllm",
        eager: bool = True,
    ) -> None:
        self.model = str(model)
        self.name = name
        self.port = free_port()
        self.log_path = log_path
        args = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            self.model,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *(["--enforce-eager"] if eager else []),
            "--max-model-len",
            "512",
            "--max-num-seqs",
            "4",
        ]
        if swarm is not None:
            args += ["--load-format", "swarm", "--model-loader-extra-config", json.dumps(swarm)]
        args += extra_args or []
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
        full_env["PYTHONPATH"] = os.pathsep.join(
            [str(ROOT), *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]]
        )
        for var in list(full_env):
            if var.startswith("SWARM_"):
                del full_env[var]
        full_env.update(env or {})
        self.started = time.monotonic()
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(
            args, stdout=self._log, stderr=subprocess.STDOUT, env=full_env, start_new_session=True, cwd=ROOT
        )
        self.ready_s: float | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_ready(self, timeout: float = 240.0) -> VllmServer:
        deadline = self.started + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise ServerError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        self.ready_s = time.monotonic() - self.started
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        raise ServerError(f"{self.name} not ready after {timeout:.0f} s:\n{self.tail()}")

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise ServerError(f"{self.name} still running after {timeout:.0f} s:\n{self.tail()}") from None

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.log().splitlines()[-n:])

    def complete(self, prompt: str, max_tokens: int = 24) -> list[int]:
        """Greedy completion; returns the generated token ids."""
        body = json.dumps(
            {
                "model": self.model,
                "prompt": prompt,
                "max_tokens": max_tokens,
                "temperature": 0,
                "return_token_ids": True,
            }
        ).encode()
        req = urllib.request.Request(
            self.url + "/v1/completions", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=60) as r:
            out = json.loads(r.read())
        choice = out["choices"][0]
        ids = choice.get("token_ids")
        if ids is None:
            raise ServerError(f"no token ids in the reply: {out}")
        return [int(i) for i in ids]

    def stop(self) -> None:
        """Kill the whole process group (API server, engine core, workers); bounded in time."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # stragglers of the group (workers)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        self._log.close()
