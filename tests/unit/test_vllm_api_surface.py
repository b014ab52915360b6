"""vllm_plugin touches vLLM only through its stable loader API (vllm_plugin.compat says which): no private
name, no module outside the allowed list. A private import breaks on the next vLLM release (the loader
of 0.32 imported `_has_online_quant` and called `create_model`, and failed on 0.24 and 0.28)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PLUGIN = Path(__file__).resolve().parents[2] / "vllm_plugin"

#: vLLM modules the plugin may import, and why each is stable.
ALLOWED = {
    "vllm": "__version__",
    "vllm.distributed": "the parallel-group accessors, public since 0.x",
    "vllm.logger": "init_logger, used by every plugin",
    "vllm.model_executor.model_loader": "BaseModelLoader, DefaultModelLoader, register_model_loader",
}


def _vllm_imports(path: Path) -> list[tuple[int, str, str]]:
    out: list[tuple[int, str, str]] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "vllm":
            out += [(node.lineno, node.module, a.name) for a in node.names]
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name, "") for a in node.names if a.name.split(".")[0] == "vllm"]
    return out


@pytest.mark.parametrize("path", sorted(PLUGIN.glob("*.py")), ids=lambda p: p.name)
def test_only_the_stable_loader_api(path: Path) -> None:
    bad = [
        f"{path.name}:{line}: from {module} import {name}"
        for line, module, name in _vllm_imports(path)
        if module not in ALLOWED or name.startswith("_")
    ]
    assert not bad, "private or unlisted vLLM imports:\n" + "\n".join(bad)


def test_the_check_sees_imports() -> None:
    """The walk finds imports inside functions too (the loader imports lazily)."""
    found = {m for f in PLUGIN.glob("*.py") for _, m, _ in _vllm_imports(f)}
    assert "vllm.model_executor.model_loader" in found and "vllm.distributed" in found


def test_supported_range() -> None:
    pytest.importorskip("vllm")
    from vllm_plugin.compat import supported

    assert supported("0.24.0") and supported("0.28.0") and supported("0.33.9.dev1+gabc")
    assert not supported("0.23.1") and not supported("0.34.0") and not supported("garbage")
