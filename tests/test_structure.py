"""The house rules, checked: no import cycles (counting imports inside functions too) and
dependencies that run one way only: apps → sessions → models → checkpoints/modules → cpu."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"moshi_mlx": ROOT / "moshi_mlx", "moshi_mlx.apps": ROOT / "apps", "moshi_mlx.convert": ROOT / "convert"}


def modules() -> dict[str, Path]:
    out = {}
    for pkg, base in PACKAGES.items():
        for path in base.rglob("*.py"):
            rel = path.relative_to(base).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([pkg, *parts])] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """moshi_mlx modules imported anywhere in `path` (module level or inside functions)."""
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[: len(name.split(".")) - node.level + (1 if is_pkg else 0)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name and t != "moshi_mlx":  # the package root only preloads BLAS
                found.add(t)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports(m, p, set(mods)) for m, p in mods.items()}


def test_no_import_cycles():
    g = graph()
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for n in sorted(g.get(m, ())):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " → ".join(path[path.index(n):] + [n]))
            if n not in state:
                visit(n)
        path.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)


LAYERS = [  # (prefix, prefixes it must never import)
    ("moshi_mlx.cpu", ("moshi_mlx.modules", "moshi_mlx.models", "moshi_mlx.checkpoints", "moshi_mlx.sessions",
                       "moshi_mlx.apps")),
    ("moshi_mlx.checkpoints", ("moshi_mlx.models", "moshi_mlx.modules", "moshi_mlx.sessions", "moshi_mlx.apps")),
    ("moshi_mlx.modules", ("moshi_mlx.models", "moshi_mlx.checkpoints", "moshi_mlx.sessions", "moshi_mlx.apps")),
    ("moshi_mlx.models", ("moshi_mlx.sessions", "moshi_mlx.apps", "moshi_mlx.convert")),
    ("moshi_mlx.sessions", ("moshi_mlx.apps", "moshi_mlx.convert")),
]


def test_dependencies_run_one_way():
    bad = []
    for m, deps in graph().items():
        for prefix, forbidden in LAYERS:
            if m.startswith(prefix):
                bad += [f"{m} imports {d}" for d in deps if d.startswith(forbidden)]
    assert not bad, bad
