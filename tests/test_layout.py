"""The package's layers import one way: `version` (a leaf) <- `ops` (pure torch) <- `variants` <- `config` <- `hf`
(Transformers) <- the package root, which only gathers the public names: nothing below it imports it."""

import ast
import os
import pathlib

import pytest

PACKAGE = os.path.join(os.path.dirname(__file__), "..", "attentiondrop_hf")
# Layer of each part of the package, lowest first; a module may import its own layer and those below it.
LAYERS = {"version": 0, "ops": 1, "variants": 2, "config": 3, "hf": 4}
ROOT = 5  # `attentiondrop_hf` itself (its __init__)


def layer_of(module: str) -> int | None:
    """The layer of `attentiondrop_hf.<part>...` (or of a relative import resolved to it); the root's for
    `attentiondrop_hf` itself (`import attentiondrop_hf`, `from . import name` at the top of the package)."""
    parts = module.split(".")
    if parts[0] != "attentiondrop_hf":
        return None
    return LAYERS.get(parts[1]) if len(parts) > 1 else ROOT


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
    yield "root", os.path.join(PACKAGE, "__init__.py"), "attentiondrop_hf"
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
    layer = ROOT if part == "root" else LAYERS[part]
    for module in imports(path, package):
        if layer_of(module) is not None:
            assert layer_of(module) <= layer, f"{path} imports {module}"
        if layer < LAYERS["hf"]:
            assert not module.startswith(("transformers", "accelerate", "datasets")), f"{path} imports {module}"


def test_the_layers_check_sees_an_import_of_the_package_root():
    """`from . import __version__` in config.py once ran back up to the root: the check must catch that arrow."""
    assert layer_of("attentiondrop_hf") == ROOT > LAYERS["config"]
    assert imports_of_source("from . import __version__", "attentiondrop_hf") == ["attentiondrop_hf"]


def imports_of_source(source: str, package: str) -> list[str]:
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as handle:
        handle.write(source)
    try:
        return imports(handle.name, package)
    finally:
        os.unlink(handle.name)


def test_every_function_of_the_package_is_annotated():
    """py.typed promises users' type checkers an annotated API: every parameter and every return, helpers included
    (they become public soon enough)."""
    missing = []
    for path in sorted(pathlib.Path(PACKAGE).resolve().rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                arguments = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
                arguments = [a for a in arguments if a.arg not in ("self", "cls")]
                arguments += [a for a in (node.args.vararg, node.args.kwarg) if a is not None]
                if node.returns is None or any(a.annotation is None for a in arguments):
                    missing.append(f"{path.name}:{node.lineno} {node.name}")
    assert not missing, missing
