"""The package's import structure, read from the source (every import, also those inside
functions): no import cycle, the layers import only downwards, and the plain-PyTorch references
reach no module of the fused code (docs/architecture.md); importing them in a fresh interpreter
loads no fused module and registers no custom op."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "crystal_ext"

# Lowest first: a module may import its own layer and the layers before it.
LAYERS = ("ops", "model", "data", "training")

# The modules that register custom ops or load the compiled extension.
FUSED = {
    "crystal_ext.ops._extension",
    "crystal_ext.ops.attention_alignment_loss",
    "crystal_ext.ops.lm_head_losses",
    "crystal_ext.ops.lm_head_plan",
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def import_graph() -> dict[str, set[str]]:
    """Each module -> the package's modules it imports (a package's __init__ only when it is
    imported for its own names, not for a submodule)."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    targets.add(sub if sub in modules else node.module)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) < 2 or module.endswith("__init__"):
        return None
    return LAYERS.index(parts[1]) if parts[1] in LAYERS else len(LAYERS)  # commands on top


def test_no_import_cycle():
    graph = {m: {t for t in ts if _layer(t) is not None} for m, ts in import_graph().items()}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_find_cycle_finds_a_lazy_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_layers_import_only_downwards():
    upward = [
        f"{m} -> {t}"
        for m, targets in import_graph().items()
        for t in targets
        if _layer(m) is not None and _layer(t) is not None and _layer(t) > _layer(m)
    ]
    assert not upward, "imports going up a layer: " + ", ".join(sorted(upward))


def test_references_reach_no_fused_module():
    graph = import_graph()
    for module in ("crystal_ext.ops.reference", "crystal_ext.ops.checks", "crystal_ext.ops.model_logits"):
        fused = _reachable(graph, module) & FUSED
        assert not fused, f"{module} imports the fused code: {sorted(fused)}"


def _fresh_interpreter(code: str) -> dict:
    """What `code` prints as JSON, run in a new interpreter on this checkout's package."""
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=PACKAGE.parent, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


def test_importing_the_references_registers_no_fused_op():
    loaded = _fresh_interpreter(
        "import json, sys, torch\n"
        "import crystal_ext.ops.reference\n"
        "ops = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith('crystal_ext::')]\n"
        "print(json.dumps({'ops': ops, 'modules': sorted(m for m in sys.modules if m.startswith('crystal_ext'))}))"
    )
    assert loaded["ops"] == []
    fused = set(loaded["modules"]) & (FUSED | {"crystal_ext._C"})
    assert not fused, f"importing crystal_ext.ops.reference loads {sorted(fused)}"


def test_public_op_names_are_the_ops_whatever_was_imported_first():
    """The ops share their names with their modules: importing a module first (as the model code
    does) must not leave the module where the op's name is."""
    names = _fresh_interpreter(
        "import json\n"
        "import crystal_ext.ops.attention_alignment_loss, crystal_ext.ops.lm_head_losses\n"
        "import crystal_ext\n"
        "from crystal_ext.ops import attention_alignment_loss, lm_head_losses, reference\n"
        "print(json.dumps([type(f).__name__ for f in (attention_alignment_loss, lm_head_losses,\n"
        "    crystal_ext.lm_head_losses, crystal_ext.attention_alignment_loss, reference)]))"
    )
    assert names == ["function", "function", "function", "function", "module"]
