"""The package's layers import one way: `ops` (pure torch) <- `variants` <- `config` <- `hf` (Transformers)."""

import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(__file__), "..", "attentiondrop_hf")
# Layer of each part of the package, lowest first; a module may import its own layer and those below it.
LAYERS = {"ops": 0, "variants": 1, "config": 2, "hf": 3}


def layer_of(module: str) -> int | None:
    """The layer of `attentiondrop_hf.<part>...` (or of a relative import resolved to it)."""
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 and parts[0] == "attentiondrop_hf" else None


def imports(path: str, package: str) -> list[str]:
    tree = ast.parse(open(path, encoding="utf-8").read())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                found.append(".".join(base + ([node.module] if node.module else [])))
            else:
                found.append(node.module)
    return found


def package_files():
    for part in LAYERS:
        folder = os.path.join(PACKAGE, part)
        paths = (
            [os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".py")]
            if os.path.isdir(folder)
            else [os.path.join(PACKAGE, f"{part}.py")]
        )
        for path in sorted(paths):
            package = f"attentiondrop_hf.{part}" if os.path.isdir(folder) else "attentiondrop_hf"
            yield part, path, package


@pytest.mark.parametrize("part, path, package", list(package_files()), ids=lambda v: os.path.basename(str(v)))
def test_imports_point_down_the_layers(part, path, package):
    for module in imports(path, package):
        if layer_of(module) is not None:
            assert layer_of(module) <= LAYERS[part], f"{path} imports {module}"
        if LAYERS[part] < LAYERS["hf"]:
            assert not module.startswith(("transformers", "accelerate", "datasets")), f"{path} imports {module}"
