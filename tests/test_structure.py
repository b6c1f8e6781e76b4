"""The code's structural bounds (issue 22): small modules, no import circle, no private name used
across modules. Read from the installed package's sources with `ast`; nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

import layerstream

ROOT = Path(layerstream.__file__).parent
PACKAGES = ("", "loader", "compute", "compute/cpu", "coordinator", "proto")  # pyproject's [tool.setuptools] packages
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    """Every product module, by dotted name (benchmarks and tests are not installed)."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).glob("*.py")):
            parts = ["layerstream", *filter(None, pkg.split("/"))]
            if path.stem != "__init__":
                parts.append(path.stem)
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(tree: ast.AST) -> list[ast.ImportFrom | ast.Import]:
    """The module's layerstream imports, at any depth (a function-local import is still an edge)."""
    return [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("layerstream")
            or isinstance(n, ast.Import) and any(a.name.startswith("layerstream") for a in n.names)]


def _graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        deps = set()
        for node in _imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            else:
                deps |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                         for a in node.names}
        graph[name] = {d for d in deps if d in MODULES and d != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's, iterative)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_the_package_is_found_with_its_modules():
    """(The other tests read these files: an empty list would pass them all.)"""
    assert len(MODULES) > 50 and "layerstream.compute.model" in MODULES and "layerstream.proto.codec" in MODULES


def test_no_product_module_is_over_the_line_bound():
    over = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not over, f"modules over {MAX_LINES} lines (split them by concept): {over}"


def test_no_import_circle():
    assert not _cycles(_graph())


def test_the_cycle_finder_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_private_name_is_imported_or_read_from_another_module():
    """`from layerstream.x import _name`, or `x._name` on a layerstream module imported as x."""
    found = []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        aliases = set()
        for node in _imports(tree):
            if isinstance(node, ast.ImportFrom):
                found += [f"{name}: from {node.module} import {a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
                aliases |= {a.asname or a.name for a in node.names if f"{node.module}.{a.name}" in MODULES}
            else:
                aliases |= {a.asname or a.name for a in node.names}
        found += [f"{name}: {ast.unparse(n)}" for n in ast.walk(tree)
                  if isinstance(n, ast.Attribute) and n.attr.startswith("_") and not n.attr.startswith("__")
                  and isinstance(n.value, ast.Name) and n.value.id in aliases]
    assert not found, found


MAX_FIELDS = 16
# Records over the bound today, each with why it stays: a new one is grouped by concept instead
# (HParams, PipelineConfig, StepMeta and core._Request were, into nested dataclasses).
FIELD_BOUND_EXCEPTIONS = {
    "layerstream.compute.compute_config.ComputeConfig": "left: the compute process's start-up message",
    "layerstream.coordinator.plan.Plan": "left: the plan's outputs, read by launch, stats and the benches",
    "layerstream.loader.synth_shapes.ModelShape": "a published model's config, flat as its config.json",
}
_RECORD_DECORATORS = ("dataclass", "message", "struct")  # dataclasses, and proto's @message / @struct records


def _record_fields(tree: ast.AST) -> dict[str, int]:
    """Each dataclass-like class's field count: annotated names in its body, ClassVars aside."""
    out = {}
    for node in ast.walk(tree):
        if not isinstance(node, ast.ClassDef):
            continue
        names = {ast.unparse(d.func if isinstance(d, ast.Call) else d).rsplit(".", 1)[-1] for d in node.decorator_list}
        if names & set(_RECORD_DECORATORS):
            out[node.name] = sum(isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)
                                 and "ClassVar" not in ast.unparse(s.annotation) for s in node.body)
    return out


def test_no_record_holds_more_fields_than_the_bound():
    counts = {f"{name}.{cls}": n for name, path in MODULES.items()
              for cls, n in _record_fields(ast.parse(path.read_text())).items()}
    assert "layerstream.loader.gguf_index.HParams" in counts and "layerstream.proto.messages.Forward" in counts
    over = {k: n for k, n in counts.items() if n > MAX_FIELDS and k not in FIELD_BOUND_EXCEPTIONS}
    assert not over, f"records over {MAX_FIELDS} fields (group them by concept, as nested frozen dataclasses): {over}"
    stale = [k for k in FIELD_BOUND_EXCEPTIONS if counts.get(k, 0) <= MAX_FIELDS]
    assert not stale, f"no longer over the bound: drop them from FIELD_BOUND_EXCEPTIONS: {stale}"


def test_the_field_counter_counts_fields_only():
    tree = ast.parse("from dataclasses import dataclass, field\nimport dataclasses\n"
                     "@dataclass(frozen=True)\nclass A:\n    X: ClassVar[int] = 1\n    a: int\n    b: int = 0\n"
                     "    c: int = field(init=False)\n    def f(self) -> int:\n        y: int = 1\n        return y\n"
                     "@dataclasses.dataclass\nclass B:\n    a: int\nclass C:\n    a: int\n"
                     "@message(3)\nclass D:\n    a: int\n    b: int\n")
    assert _record_fields(tree) == {"A": 3, "B": 1, "D": 2}
