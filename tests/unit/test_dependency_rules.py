"""The design's dependency rules, read from the import statements of the source files: core imports no family,
train and the families import neither bench nor cli, and a family imports another only where the design allows it
(merging and incremental use adapters: LoRA merging, HOP's adapter per problem)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "edgetune"
FAMILIES = ("sparse", "adapters", "merging", "incremental")
ALLOWED = {("merging", "adapters"), ("incremental", "adapters")}


def _imports(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return {m for m in out if m.startswith("edgetune.")}


def _package(path: Path) -> str:
    return path.relative_to(SRC).parts[0].removesuffix(".py")


def test_dependency_rules() -> None:
    broken = []
    for path in sorted(SRC.rglob("*.py")):
        pkg = _package(path)
        in_bench = "bench" in path.relative_to(SRC).parts[1:-1]  # a family's bench suites sit on top, like bench/
        for mod in _imports(path):
            target = mod.split(".")[1]
            if pkg == "core" and (target in FAMILIES or target in ("train", "cli", "bench", "pipeline")):
                broken.append(f"{path.relative_to(SRC)} imports {mod}: core knows no method, loop or CLI")
            if pkg in (*FAMILIES, "train", "core", "data", "models") and target in ("cli",):
                broken.append(f"{path.relative_to(SRC)} imports {mod}: nothing below the CLI imports it")
            if pkg in FAMILIES and target == "bench" and not in_bench:
                broken.append(f"{path.relative_to(SRC)} imports {mod}: library code does not import bench")
            if pkg in FAMILIES and target in FAMILIES and target != pkg and (pkg, target) not in ALLOWED:
                broken.append(f"{path.relative_to(SRC)} imports {mod}: families do not import each other")
    assert not broken, "\n".join(broken)
