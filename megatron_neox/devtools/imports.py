"""The layer order of megatron_neox, and a check that the imports keep to it.

    python -m megatron_neox.devtools.imports        # exit 0, or 1 with every offending import

`LAYERS` is the one place the intended order is written (README's Layout section shows it). A
unit (a top-level module such as `config`, or a subpackage such as `training`) may import units of
lower layers and itself, never a unit of its own or a higher layer. Entry points (tools/,
launch/, benchmarks/) sit above every layer and are not checked. Every import counts: module
level, inside functions (lazy imports), and under `if TYPE_CHECKING:` (an annotation-only import
still says the module knows about a higher layer). On top of the layer rule the module-level
graph, packages included, must have no cycle.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

PACKAGE = "megatron_neox"
ROOT = Path(__file__).resolve().parent.parent
_HERE = "megatron_neox/devtools/imports.py"

# Bottom to top. A rule several layers share lives in the lowest layer that needs it.
LAYERS: Tuple[Tuple[str, ...], ...] = (
    ("errors", "cli", "durable", "ranks"),   # exception types, argparse types, atomic writes, rank 0 first
    ("hardware", "tokenizer", "parallel", "checkpoint_files"),  # no knowledge of the config
    ("outputs",),                            # output directories (never replace a checkpoint)
    ("data",),                               # indexed datasets, blends, the loader; data defaults/checks
    ("layout",),                             # every (world, pp, tp, dp, batch) rule
    ("precision",),                          # precision and ZeRO rules; the ZeRO-stage decision
    ("config",),                             # the typed config tree
    ("resolve",),                            # the config resolved once for a world (every 'auto' decided)
    ("model",),                              # GPT-NeoX layers and the layer list
    ("topology",),                           # the 3D process grid
    ("convert",),                            # HF import/export, merged state dicts, universal checkpoints
    ("generate",),                           # sampling from a merged checkpoint
    ("evaluation",),                         # lm-eval adapter, perplexity, knowledge probe
    ("plan",),                               # what a layout costs (memory, recompute choice) before launching
    ("training",),                           # engine, step, loop, checkpoints, schedules, metrics
    ("devtools",),                           # this checker
)


def layer_of() -> Dict[str, int]:
    return {unit: i for i, layer in enumerate(LAYERS) for unit in layer}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def unit_of(module: str) -> str:
    """'megatron_neox.training.step' -> 'training'; 'megatron_neox.config' -> 'config'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(path: Path, module: str) -> Iterator[Tuple[int, str]]:
    """(line, imported megatron_neox module) for every import statement of the file."""
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")
                base = base[:len(base) - node.level + (1 if is_pkg else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                sub = f"{target}.{alias.name}"
                yield node.lineno, sub if _exists(sub) else target


def _exists(module: str) -> bool:
    rel = Path(*module.split("."))
    return (ROOT.parent / rel.with_suffix(".py")).is_file() or (ROOT.parent / rel / "__init__.py").is_file()


def graph() -> Dict[str, List[Tuple[int, str]]]:
    """module -> [(line, imported module)], for every module of the package."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        mod = module_name(path)
        out[mod] = sorted({(line, t) for line, t in _imports(path, mod) if t != mod})
    return out


def _file(module: str) -> str:
    rel = Path(*module.split("."))
    f = rel.with_suffix(".py")
    return str(f if (ROOT.parent / f).is_file() else rel / "__init__.py")


def layer_problems(g: Dict[str, List[Tuple[int, str]]]) -> List[str]:
    layer, problems = layer_of(), []
    for mod, edges in g.items():
        src = unit_of(mod)
        if src not in layer:
            if src:
                problems.append(f"{_file(mod)}: unit {src!r} is in no layer: add it to LAYERS in {_HERE}")
            continue
        for line, target in edges:
            dst = unit_of(target)
            if dst == src or not dst:
                continue
            if dst not in layer:
                problems.append(f"{_file(mod)}:{line}: imports {target}, whose unit {dst!r} is in no layer")
            elif layer[dst] >= layer[src]:
                where = "the same layer" if layer[dst] == layer[src] else "a higher layer"
                problems.append(f"{_file(mod)}:{line}: {src} imports {target} from {where} ({dst})")
    return problems


def cycles(g: Dict[str, List[Tuple[int, str]]]) -> List[List[str]]:
    """Every strongly connected component of more than one module (Tarjan), as a sorted list."""
    nodes: Set[str] = set(g) | {t for edges in g.values() for _, t in edges}
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for _, w in g.get(v, []):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(nodes)))
    try:
        for v in sorted(nodes):
            if v not in index:
                visit(v)
    finally:
        sys.setrecursionlimit(limit)
    return found


def problems() -> List[str]:
    g = graph()
    out = layer_problems(g)
    out += [f"import cycle: {' <-> '.join(c)}" for c in cycles(g)]
    return out


def main() -> int:
    found = problems()
    for p in found:
        print(p)
    if found:
        print(f"{len(found)} import problem(s); the layer order is LAYERS in {_HERE}")
        return 1
    print(f"imports follow the {len(LAYERS)} layers of {_HERE}; no cycle")
    return 0


if __name__ == "__main__":
    sys.exit(main())
