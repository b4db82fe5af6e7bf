"""The import contract of docs/architecture.md, read from the source (no imports run):

    errors, dtypes, layout, plots          the foundation
    decompose <- quant <- io <- {models, data} <- init <- {train, convert, eval} <- report <- cli

- a package imports only from packages to its left (and the foundation);
- `decompose` imports nothing third-party but torch; `io` imports neither peft nor transformers' model code;
- no import cycles between modules, counting imports inside functions;
- third-party imports inside functions are the listed lazy ones;
- module and function sizes stay readable (no module over 400 lines, no function over 60 but CLI commands).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).parents[1] / "src" / "pissa"
FOUNDATION = {"errors", "dtypes", "layout", "plots", "__init__"}
LAYERS = [{"decompose"}, {"quant"}, {"io"}, {"models", "data"}, {"init"}, {"train", "convert", "eval"}, {"report"},
          {"cli"}]
RANK = {package: i for i, layer in enumerate(LAYERS) for package in layer}
STDLIB_OK = {"__future__", "abc", "collections", "contextlib", "dataclasses", "math", "threading", "typing", "warnings",
             "zlib"}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[tuple[str, bool]]:
    """(absolute module, at top level) of every import in a file; relative imports resolved."""
    tree = ast.parse(path.read_text())
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rsplit(".", 1)[0]
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            names = [f"{target}.{a.name}" for a in node.names] if node.level and not node.module else [target]
            found += [(n, id(node) in top) for n in names]
    return found


FILES = sorted(SRC.rglob("*.py"))


def package_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "pissa" or len(parts) == 1:
        return None
    return "__init__" if parts[1].startswith("__") else parts[1]  # pissa.__version__ is the package root


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SRC)))
def test_dependencies_flow_one_way(path):
    own = package_of(module_name(path)) or "__init__"
    if own in FOUNDATION:
        allowed = FOUNDATION
    else:
        allowed = FOUNDATION | {p for p, r in RANK.items() if r <= RANK[own]}
    for target, _ in imports_of(path):
        package = package_of(target)
        if package is None or package == own:
            continue
        assert package in allowed, f"{path.relative_to(SRC)} imports pissa.{package}, which is not below {own}"
    if own in FOUNDATION and own != "__init__":
        assert all(package_of(t) in (None, "errors") for t, _ in imports_of(path)), \
            f"foundation module {path.name} may import only pissa.errors"


def test_decompose_imports_only_torch():
    for path in (SRC / "decompose").glob("*.py"):
        for target, _ in imports_of(path):
            root = target.split(".")[0]
            assert root in {"torch", "pissa"} | STDLIB_OK, f"{path.name} imports {target}"
            if root == "pissa":
                assert package_of(target) in {"decompose", "errors"}, f"{path.name} imports {target}"


def test_io_imports_neither_peft_nor_model_code():
    for path in (SRC / "io").glob("*.py"):
        for target, _ in imports_of(path):
            assert not target.startswith("peft"), f"io/{path.name} imports {target}"
            assert not target.startswith(("transformers.models", "transformers.modeling")), \
                f"io/{path.name} imports {target}"
            assert target not in ("transformers",), f"io/{path.name} imports transformers"


# Third-party modules imported inside functions on purpose: heavy or optional packages that a command may never
# need (each costs a tenth of a second to seconds at start-up, or is an optional install), and stdlib modules used
# in one place. Any other third-party import goes at the top of its module. pissa's own modules may be imported
# inside a function (to keep a command's start-up to what it uses); the layering and cycle tests count those too.
LAZY_THIRD_PARTY = {"PIL", "accelerate", "bitsandbytes", "datasets", "deepspeed", "huggingface_hub", "jinja2",
                    "matplotlib", "peft", "rich.progress", "torch.distributed", "torch.utils.tensorboard",
                    "transformers", "trl", "vllm", "yaml"}
LAZY_STDLIB = {"ctypes", "fcntl", "importlib.util", "json", "shutil", "time"}


def test_third_party_imports_inside_functions_are_the_listed_lazy_ones():
    unlisted = [f"{module_name(p)} imports {target} inside a function" for p in FILES
                for target, top in imports_of(p) if not top and not target.startswith("pissa")
                and not any(target == lazy or target.startswith(lazy + ".") for lazy in LAZY_THIRD_PARTY | LAZY_STDLIB)]
    assert not unlisted, "move these to the top of the module, or list them with the reason:\n" + "\n".join(unlisted)


def test_no_import_cycles():
    """Imports between pissa modules form no cycle, counting those inside functions: a cycle hidden in a
    function is still two modules that cannot be understood (or loaded) one without the other."""
    modules = {module_name(p): p for p in FILES}
    graph = defaultdict(set)
    for name, path in modules.items():
        for target, _ in imports_of(path):
            if not target.startswith("pissa"):
                continue
            while target not in modules and "." in target:  # `from pkg import name` -> the module that holds it
                target = target.rsplit(".", 1)[0]
            if target in modules and target != name and not name.startswith(target + "."):
                graph[name].add(target)
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for name in sorted(modules):
        if name not in state:
            visit(name, [name])


def test_modules_and_functions_stay_readable():
    long_modules = [f"{p.relative_to(SRC)}: {n}" for p in FILES if (n := len(p.read_text().splitlines())) > 400]
    assert not long_modules, f"modules over 400 lines: {long_modules}"
    long_functions = []
    for path in FILES:
        if path.parent.name == "cli":  # a command's signature is its option list
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno + 1 > 60:
                long_functions.append(f"{path.relative_to(SRC)}:{node.name}")
    assert not long_functions, f"functions over 60 lines: {long_functions}"
