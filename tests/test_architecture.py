"""The package's shape: one-way layers (import-linter), no private names across packages, no test-only
switches in production code, and a Layout page (docs/layout.md) that matches the tree."""

import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "llada_jax")


def modules():
    """(dotted name, path) of every module of the package (the exported PyTorch files excluded: they are
    copied into Hugging Face directories, not imported by the package)."""
    for directory, dirs, files in os.walk(PACKAGE):
        dirs[:] = [d for d in dirs if d not in ("__pycache__", "hf_files")]
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(directory, f)
                rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                yield rel.removesuffix(".__init__"), path


def owner(module: str) -> str:
    """The top-level package or module of llada_jax a module belongs to (llada_jax.train.loop -> train)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_layers_point_one_way():
    from importlinter.cli import lint_imports

    assert lint_imports(config_filename=os.path.join(ROOT, ".importlinter"), no_cache=True, no_logo=True) == 0


@pytest.mark.parametrize("module, code, broken", [
    ("model/moe.py", "from llada_jax.train import loop", "llada_jax.model.moe -> llada_jax.train.loop"),
    # the checkpoint layer's own order (issue 28: a cycle through the LoRA checkpoints, in function-local imports)
    ("checkpoints/orbax_model.py", "from llada_jax.checkpoints import adapters",
     "llada_jax.checkpoints.orbax_model -> llada_jax.checkpoints.adapters"),
    # a new module of the checkpoint layer must be given its place in the order
    ("checkpoints/extra.py", "pass", "llada_jax.checkpoints.extra"),
])
def test_the_layer_contracts_catch_an_upward_import(tmp_path, module, code, broken):
    """The contracts are not vacuous: a copy of the package with an upward (function-local) import, or a module
    the checkpoint layer's order does not place, breaks them."""
    import shutil
    import subprocess
    import sys

    shutil.copytree(PACKAGE, tmp_path / "llada_jax", ignore=shutil.ignore_patterns("__pycache__"))
    path = tmp_path / "llada_jax" / module
    path.write_text((path.read_text() if path.exists() else "") + f"\n\ndef _upward():\n    {code}  # noqa\n")
    proc = subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports; "
                           f"sys.exit(lint_imports(config_filename={os.path.join(ROOT, '.importlinter')!r}, "
                           "no_cache=True, no_logo=True))"], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 1 and broken in proc.stdout, proc.stdout[-2000:]


def private_imports(module: str, path: str):
    """(line, what) of every private name this module takes from another package of llada_jax."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    aliases = {}  # local name -> llada_jax module it stands for
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("llada_jax"):
            for alias in node.names:
                other = f"{node.module}.{alias.name}"
                if owner(node.module) != owner(module) and alias.name.startswith("_"):
                    yield node.lineno, f"from {node.module} import {alias.name}"
                aliases[alias.asname or alias.name] = other
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("llada_jax"):
                    aliases[alias.asname or alias.name] = alias.name
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__") \
                and isinstance(node.value, ast.Name) and node.value.id in aliases:
            target = aliases[node.value.id]
            if target.startswith("llada_jax.") and owner(target) != owner(module):
                yield node.lineno, f"{node.value.id}.{node.attr}"


def test_no_package_uses_another_packages_private_names():
    found = [f"{module}:{line}: {what}" for module, path in modules() for line, what in private_imports(module, path)]
    assert not found, found


def test_the_private_name_check_sees_both_forms(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("from llada_jax.sampling.samplers import _program\nfrom llada_jax import sharding\n"
                    "sharding._as_tuple(1)\nfrom llada_jax.train import _ok\n")
    found = [what for _, what in private_imports("llada_jax.train.loop", str(path))]
    assert found == ["from llada_jax.sampling.samplers import _program", "sharding._as_tuple"]


# Environment variables the package reads: the documented start-up variables of `llada_jax.distributed` and
# the JSONL index cache directory. A fault-injection or other test-only switch would be a new name here.
DOCUMENTED_VARIABLES = {"LLADA_JAX_COORDINATOR_ADDRESS", "LLADA_JAX_NUM_PROCESSES", "LLADA_JAX_PROCESS_ID",
                        "LLADA_JAX_HEARTBEAT_TIMEOUT", "LLADA_JAX_DISTRIBUTED", "LLADA_JAX_CACHE"}


def test_production_code_reads_no_test_only_variable():
    names = set()
    for _, path in modules():
        text = open(path, encoding="utf-8").read()
        names |= set(re.findall(r"LLADA_JAX_[A-Z_]+", text))
        prefix = re.search(r"ENV_PREFIX = \"(LLADA_JAX_)\"", text)
        if prefix:  # distributed.py builds its names from a prefix
            names |= {prefix.group(1) + n for n in re.findall(r"_int_env\(environ, \"([A-Z_]+)\"\)", text)}
            names |= {prefix.group(1) + n for n in re.findall(r"ENV_PREFIX \+ \"([A-Z_]+)\"", text)}
    names.discard("LLADA_JAX_")
    assert "LLADA_JAX_PROCESS_ID" in names  # the scan sees distributed.py's prefixed names
    assert names <= DOCUMENTED_VARIABLES, names - DOCUMENTED_VARIABLES


LAYOUT_PAGE = os.path.join(ROOT, "docs", "layout.md")  # the Layout, linked from the README


def readme_layout() -> dict[str, str]:
    """The modules docs/layout.md lists (its "Modules" block), by path."""
    text = open(LAYOUT_PAGE, encoding="utf-8").read()
    block = re.search(r"^## Modules\n.*?```\n(.*?)```", text, re.S | re.M).group(1)
    return {line.split()[0]: line for line in block.splitlines() if line.startswith("llada_jax/")}


def test_readme_layout_lists_every_top_level_module_and_package():
    listed = readme_layout()
    on_disk = {f"llada_jax/{name}" + ("/" if os.path.isdir(os.path.join(PACKAGE, name)) else "")
               for name in os.listdir(PACKAGE)
               if not name.startswith("__") and (name.endswith(".py") or
                                                 os.path.isfile(os.path.join(PACKAGE, name, "__init__.py")))}
    assert set(listed) == on_disk


@pytest.mark.parametrize("layer", ["demo", "cli", "train", "eval", "data", "sampling", "checkpoints", "model",
                                   "sharding", "config", "errors"])
def test_readme_layers_agree_with_the_contract(layer):
    config = open(os.path.join(ROOT, ".importlinter"), encoding="utf-8").read()
    layers = [line.strip() for line in config.split("layers =", 1)[1].split("#", 1)[0].splitlines() if line.strip()]
    text = open(LAYOUT_PAGE, encoding="utf-8").read()
    diagram = re.search(r"^## Layers\n.*?Layers, top to bottom.*?```\n(.*?)```", text, re.S | re.M).group(1)
    rows = [line.strip() for line in diagram.splitlines() if line.strip()]
    index = [i for i, row in enumerate(layers) if f"llada_jax.{layer}" in row.split()]
    readme_index = [i for i, row in enumerate(rows) if layer in re.split(r"[\s|,]+", row)]
    assert index and index == readme_index, (layer, layers, rows)
