"""The layering of DESIGN.md, as the README states it: each part of the package imports only from the parts
before it in LAYERS (``__init__`` excepted), so a concept is found by its folder and nothing imports in a cycle."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "quanto_backend"
LAYERS = [
    "qtypes", "kernels", "ops", "tensor", "kv_cache", "nn", "observers", "quantize", "calibrate", "static", "smooth",
    "evaluate", "integrations", "lora", "models", "compat", "cli", "data",
]  # fmt: skip


def _imported_parts(path: Path) -> set[str]:
    parts = path.relative_to(PACKAGE).parts
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = list(parts[:-1])[: len(parts) - node.level]
            target = base + (node.module.split(".") if node.module else [node.names[0].name])
        elif node.module and node.module.startswith("quanto_backend."):
            target = node.module.split(".")[1:]
        else:
            continue
        found.add(target[0].removesuffix(".py"))
    return found


def test_every_part_is_in_a_layer():
    parts = {p.name.removesuffix(".py") for p in PACKAGE.iterdir() if not p.name.startswith("__")}
    assert parts - {"py.typed"} <= set(LAYERS)


def test_imports_follow_the_layers():
    for path in PACKAGE.rglob("*.py"):
        own = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        if own == "__init__":
            continue
        for target in _imported_parts(path) - {own}:
            assert LAYERS.index(target) < LAYERS.index(own), f"{path.relative_to(PACKAGE)} imports {target}"
