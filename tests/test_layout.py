"""The library's shape: no import circle in compiler/, the library stands without its examples,
and the names the messages tell users to call exist."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ("compiler", "passes", "runtime", "specs")


def _modules(folder: str) -> dict[str, Path]:
    """{dotted name: file} of every module under `folder` (a room of the package)."""
    out = {}
    for path in sorted((ROOT / folder).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out["upcycle." + ".".join(parts)] = path
    return out


def _imported(name: str, path: Path) -> set[str]:
    """Every module `name`'s file imports, at any depth (an import inside a function counts: it is
    still a circle, only a delayed one). Absolute names; `from X import y` gives X and X.y."""
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names)
    return found


def _graph(folder: str) -> dict[str, set[str]]:
    mods = _modules(folder)
    # an edge to a package the module lives in is no circle: the package is imported first anyway
    return {m: {t for t in _imported(m, p) if t in mods and t != m and not m.startswith(t + ".")}
            for m, p in mods.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as a path."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle_in_compiler():
    graph = _graph("compiler")
    assert len(graph) > 20  # the walk found the room
    assert _cycles(graph) == []
    # the circle issue 22 found: pipeline -> pretrained -> saving -> pipeline (reloading lived in saving)
    assert "upcycle.compiler.pipeline" not in graph["upcycle.compiler.saving"]
    assert "upcycle.compiler.saving" not in graph["upcycle.compiler.pretrained"]


@pytest.mark.parametrize("room", ["passes", "runtime", "specs"])
def test_no_import_circle_in_the_other_rooms(room):
    """Not even a delayed one (the last was runtime/kernels/backend.py's convenience wrapper calling
    back into grouped.py, which imports the kernels)."""
    graph = _graph(room)
    assert len(graph) > 5
    assert _cycles(graph) == []


def test_cycle_finder_finds_a_delayed_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.slow  # one interpreter per module: ~2 minutes on two shared cores
def test_every_compiler_module_imports_in_a_fresh_interpreter():
    """Each module imported first in its own interpreter: an import-time circle fails here, whatever
    order the test suite happened to import them in."""
    names = sorted(m for m in _modules("compiler") if not m.endswith("__main__"))
    bad = []
    for name in names:
        r = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True, cwd="/",
                           timeout=300)
        if r.returncode:
            bad.append(f"{name}: {r.stderr.strip().splitlines()[-1]}")
    assert not bad, "\n".join(bad)


def _library_files():
    yield ROOT / "__init__.py"
    for room in LIBRARY:
        yield from sorted((ROOT / room).rglob("*.py"))


def test_library_stands_without_its_examples():
    """No library module imports an example, reads a file of examples/ or edits sys.path."""
    example_modules = {p.stem for p in (ROOT / "examples").glob("*.py")}
    assert {"train", "smollm2_upcycle"} <= example_modules
    for path in _library_files():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Import):
                assert not {a.name.split(".")[0] for a in node.names} & example_modules, where
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                assert node.module.split(".")[0] not in example_modules | {"examples"}, where
            elif isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name):
                assert node.value.id != "sys", f"{where}: sys.path"
            elif isinstance(node, ast.Constant) and node.value == "examples":
                pytest.fail(f"{where}: a path into examples/")


def test_training_library_needs_neither_compiler_nor_transformers_to_import():
    code = ("import sys, upcycle.runtime.training as t\n"
            "assert t.KILL_AT_STEP_ENV == 'UPCYCLE_TRAIN_KILL_AT_STEP'\n"
            "bad = [m for m in sys.modules if m.startswith(('upcycle.compiler', 'upcycle.passes', 'transformers'))]\n"
            "assert not bad, bad\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def test_export_run_reads_the_run_folder_format_of_the_library():
    """upcycle-export-run parses run.json through the training library's format (run_dir.py)."""
    src = (ROOT / "compiler" / "export_run.py").read_text()
    assert "upcycle.runtime.training.run_dir" in src
    assert '/ "run.json"' not in src and '/ "checkpoints"' not in src and "step-{" not in src  # its names are the library's


# --- upcycle.load_into: the call upcycle.load's message names ------------------------------------

class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 32)
        self.fc2 = nn.Linear(32, 8)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([_MLP(), _MLP()])

    def forward(self, x):
        for b in self.blocks:
            x = x + b(x)
        return x


SPEC = {"experts": {"expansion": 4, "granularity": 1, "top_k": 2}, "router": {"type": "topk_then_softmax"},
        "verify": {"enabled": False}}


def test_load_into_is_exported_and_reloads_a_plain_module(tmp_path):
    import upcycle
    from upcycle.compiler.errors import ModelError

    assert "load_into" in upcycle.__all__ and callable(upcycle.load_into)
    assert upcycle.load_into is upcycle.compiler.load_into
    torch.manual_seed(0)
    moe = upcycle.compile_upcycle(_Net(), SPEC, example_inputs=(torch.randn(2, 8),))
    out = upcycle.save(moe, tmp_path / "out", spec=SPEC)
    with pytest.raises(ModelError, match=r"call upcycle\.load_into\(model, path\)"):
        upcycle.load(out)
    torch.manual_seed(1)  # other weights: everything must come from the folder
    again = upcycle.load_into(_Net(), out)
    x = torch.randn(5, 8)
    with torch.no_grad():
        assert torch.equal(again(x), moe.eval()(x))
    assert sum(isinstance(m, upcycle.MoELayer) for m in again.modules()) == 2


def test_the_moe_layer_walk_is_one_helper_without_a_circle():
    """moe_layers lives in runtime/layers.py, which imports nothing of the runtime: the pieces
    MoELayer is built from walk a model without importing moe.py back."""
    graph = _graph("runtime")
    assert graph["upcycle.runtime.layers"] == set()
    for name in ("losses", "telemetry", "balancing", "token_mask", "expert_parallel", "distributed"):
        src = (ROOT / "runtime" / f"{name}.py").read_text()
        assert "moe_layers(" in src and "named_modules()" not in src, name
    from upcycle.runtime import MoELayer, moe_layers
    from upcycle.runtime.layers import MoELayerBase, moe_layers as walk

    assert moe_layers is walk and issubclass(MoELayer, MoELayerBase)
