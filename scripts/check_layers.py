"""Check that ``prefixattn/`` is layered: every module imports only modules below it.

The order is declared here (:data:`LAYERS`, lowest first). A module may import a module
of a lower layer, never one of its own layer or above; every module of the package must
be in exactly one layer. Imports inside functions count (a lazy import is still an
arrow). A package's ``__init__`` is its own module (``prefixattn.ops``), placed where its
re-exports put it. Exit status 1 on an upward or sideways import, an undeclared module,
or a cycle, with one line per problem::

    python scripts/check_layers.py            # from the repository root
"""

from __future__ import annotations

import ast
import sys
from fnmatch import fnmatch
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "prefixattn"

# Lowest first. Patterns (fnmatch) name modules; a module takes the first layer that
# names it exactly, else the first pattern that matches.
LAYERS: list[list[str]] = [
    # process set-up that must run before torch is imported (OMP_WAIT_POLICY)
    ["prefixattn._runtime"],
    # the kernel path (prefixattn.ops): settings and the call object at the bottom
    ["prefixattn.ops.settings"],
    ["prefixattn.ops.call"],
    ["prefixattn.ops.amp"],
    ["prefixattn.ops.validation"],
    ["prefixattn.ops.reference"],
    ["prefixattn.ops.sdpa_features"],
    ["prefixattn.ops.paged_rows", "prefixattn.ops.paged_decode"],
    ["prefixattn.ops.sdpa"],
    ["prefixattn.ops.kernels"],
    ["prefixattn.ops.args"],
    ["prefixattn.ops.forward", "prefixattn.ops.backward"],
    ["prefixattn.ops.direct"],
    ["prefixattn.ops.plan"],
    ["prefixattn.ops.autograd"],
    ["prefixattn.ops.custom_op"],
    ["prefixattn.ops.varlen"],
    ["prefixattn.ops.attention"],
    ["prefixattn.ops"],
    # tools on the kernel path
    ["prefixattn.profiling"],
    # helpers below the Hugging Face glue; a new hf/ or serve/ module not named here
    # falls in its package's "*" layer (low in the package); name it if it belongs higher
    ["prefixattn.hf._compat"],
    ["prefixattn.hf._common", "prefixattn.data", "prefixattn.distributed", "prefixattn.training"],
    ["prefixattn.hf.*"],
    ["prefixattn.losses"],
    # Hugging Face glue
    ["prefixattn.hf.patching"],
    ["prefixattn.hf.tuner"],
    ["prefixattn.hf.prefix_tuning"],
    ["prefixattn.hf.prompt_tuning"],
    ["prefixattn.artifacts"],
    ["prefixattn.hf.bank"],
    ["prefixattn.hf.multitask"],
    ["prefixattn.hf"],
    ["prefixattn.tiny"],
    # test support (nothing in the library imports it) and its old import path
    ["prefixattn.testing"],
    ["prefixattn.hf.testing"],
    # the public package, then the applications on top of it
    ["prefixattn"],
    ["prefixattn.demo"],
    ["prefixattn.demo_multitask", "prefixattn.train_tasks"],
    ["prefixattn.serve.*"],
    # serving, the engine (prefixattn.serve.engine): its interface at the bottom, then the
    # data path of one step, the step loop on top
    # (config: the engine's options, pure Python; the command line reads it too)
    ["prefixattn.serve.engine.config", "prefixattn.serve.engine.request"],
    [
        "prefixattn.serve.engine.kv_cache",
        "prefixattn.serve.engine.sampling",
        "prefixattn.serve.engine.block_pool",
        "prefixattn.serve.engine.cpu_linear",
    ],
    ["prefixattn.serve.engine.kv_cache_manager"],
    ["prefixattn.serve.engine.scheduler"],
    ["prefixattn.serve.engine.runner"],
    ["prefixattn.serve.engine.cuda_graphs"],
    ["prefixattn.serve.engine.compiled"],
    ["prefixattn.serve.engine.core"],
    ["prefixattn.serve.engine"],
    # tasks loaded on demand from a folder (over the bank and the engine)
    ["prefixattn.serve.task_registry"],
    # the OpenAI front end (prefixattn.serve.openai): protocol models at the bottom, the
    # shared serving code, one class per endpoint, the router on top
    [
        "prefixattn.serve.openai.protocol",
        "prefixattn.serve.openai.errors",
        "prefixattn.serve.openai.metrics",
    ],
    ["prefixattn.serve.openai.output", "prefixattn.serve.openai.auth"],
    ["prefixattn.serve.openai.serving"],
    ["prefixattn.serve.openai.serving_chat", "prefixattn.serve.openai.serving_completion"],
    ["prefixattn.serve.openai.serving_models"],
    ["prefixattn.serve.openai.admin"],
    ["prefixattn.serve.openai.api_server"],
    ["prefixattn.serve.openai"],
    ["prefixattn.serve"],
    ["prefixattn.cli"],
    ["prefixattn.__main__"],
]


def module_name(path: Path, root: Path = ROOT) -> str:
    """``prefixattn/ops/plan.py`` -> ``prefixattn.ops.plan`` (a package's __init__: the
    package)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported(path: Path, name: str, modules: set[str]) -> set[str]:
    """The modules of the package that ``path`` (module ``name``) imports, anywhere in
    the file."""
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                pkg = base[: len(base) - node.level + 1]
                mod = ".".join(pkg + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from pkg import sub`: the submodule if there is one, else pkg itself
            targets = [
                f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod for a in node.names
            ]
        else:
            continue
        for t in targets:
            while t and t not in modules:  # `import prefixattn.ops.plan.x` -> the module
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def layer_of(name: str) -> int | None:
    """The index of the layer that declares module ``name``, or None."""
    for i, layer in enumerate(LAYERS):
        if name in layer:
            return i
    for i, layer in enumerate(LAYERS):
        if any(fnmatch(name, pat) for pat in layer if "*" in pat):
            return i
    return None


def check(root: Path = ROOT) -> list[str]:
    """Every problem of the package's import graph, one line each."""
    files = sorted((root / PACKAGE).rglob("*.py"))
    names = {module_name(f, root): f for f in files}
    problems = []
    graph: dict[str, set[str]] = {}
    for name, path in names.items():
        graph[name] = imported(path, name, set(names))
        if layer_of(name) is None:
            problems.append(f"{name}: not declared (add it to LAYERS in scripts/check_layers.py)")
    for name, deps in sorted(graph.items()):
        mine = layer_of(name)
        for dep in sorted(deps):
            theirs = layer_of(dep)
            if mine is None or theirs is None:
                continue
            if theirs >= mine:
                where = "its own layer" if theirs == mine else "a layer above it"
                problems.append(
                    f"{name} imports {dep}, which is in {where} (scripts/check_layers.py LAYERS)"
                )
    problems += [f"import cycle: {' -> '.join(c)}" for c in cycles(graph)]
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected part of ``graph`` with more than one module."""
    found, state = [], dict.fromkeys(graph, 0)  # 0 new, 1 on the path, 2 done
    path: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        path.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                found.append([*path[path.index(m) :], m])
            elif state.get(m) == 0:
                visit(m)
        path.pop()
        state[n] = 2

    for n in sorted(graph):
        if state[n] == 0:
            visit(n)
    return found


def main() -> int:
    problems = check()
    for p in problems:
        print(f"check_layers: {p}")
    if problems:
        return 1
    print(f"check_layers: {PACKAGE}/ is layered ({len(LAYERS)} layers, no upward import)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
