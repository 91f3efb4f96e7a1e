"""The layering the README draws, checked on the source: arrows point down only, and the
kernel and engine stay readable (no function over 60 lines)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "llmos"

# layer -> layers it must never import
FORBIDDEN = {
    "kernel": ("llmos.engine", "llmos.server", "llmos.api", "llmos.models"),
    "tools": ("llmos.engine", "llmos.server", "llmos.api", "llmos.models"),
    "engine": ("llmos.server", "llmos.api"),
    "models": ("llmos.engine", "llmos.kernel", "llmos.server", "llmos.api"),
    "api": ("llmos.server",),
    "cluster": ("llmos.server",),
}


def imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
    return out


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_arrows_point_down(layer):
    bad = [f"{p.relative_to(ROOT.parent)}:{line} imports {name}"
           for p in sorted((ROOT / layer).rglob("*.py")) for line, name in imports(p)
           if any(name == f or name.startswith(f + ".") for f in FORBIDDEN[layer])]
    assert not bad, "\n".join(bad)


def test_the_import_check_sees_a_violation(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("import os\nfrom llmos.engine.llm_engine import LLMEngine\ndef f():\n    import llmos.server.app\n")
    assert [n for _, n in imports(f)] == ["os", "llmos.engine.llm_engine", "llmos.server.app"]


@pytest.mark.parametrize("layer", ["kernel", "engine", "tools"])
def test_no_function_over_60_lines(layer):
    long = []
    for p in sorted((ROOT / layer).rglob("*.py")):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 60:
                    long.append(f"{p.relative_to(ROOT.parent)}:{node.lineno} {node.name} is {n} lines")
    assert not long, "\n".join(long)
