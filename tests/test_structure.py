"""The code's shape, read from its syntax trees (no imports, seconds): no import cycle among the
toolkit's modules, imports inside functions included; no dict with bare string keys sent to or
returned from Ray; and no class, function or module past the size where it usually hides two
things (STYLE.md). Today's offenders are listed by name below, each to be split; the list only
shrinks: a new offender fails here, and so does a listed one that no longer offends (split or
gone), so that its entry is struck off in the same change."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Where each package's sources live (kernels/ installs as resnet_ablate.kernels: pyproject.toml).
PACKAGES = {"resnet_ablate": ROOT / "resnet_ablate", "resnet_ablate.kernels": ROOT / "kernels"}

MAX_CLASS_LINES = 250
MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 400

# Today's offenders, by module (and qualified name): each one to be split as the redesign goes on
# (issue 23), never added to.
LONG_MODULES: set[str] = set()
LONG_CLASSES: set[str] = set()
LONG_FUNCTIONS: set[str] = set()


def _modules() -> dict[str, Path]:
    """Every module of the toolkit by its dotted name (a package by its own name)."""
    found = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if "kernels" in parts and package == "resnet_ablate":
                continue  # not this package's: kernels/ is its own source folder
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


MODULES = _modules()
TREES = {name: ast.parse(path.read_text(), filename=str(path)) for name, path in MODULES.items()}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _module_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Imports run when the module loads: at its top level, in try/if blocks, but not inside
    functions or classes, nor under `if TYPE_CHECKING:`."""
    found: list[ast.Import | ast.ImportFrom] = []
    pending: list[ast.stmt] = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.If) and not _is_type_checking(node):
            pending += node.body + node.orelse
        elif isinstance(node, ast.Try):
            pending += node.body + node.orelse + node.finalbody
            pending += [stmt for handler in node.handlers for stmt in handler.body]
    return found


def _all_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Every import the module may run, those inside functions included (not type checkers')."""
    found: list[ast.Import | ast.ImportFrom] = []
    pending: list[ast.AST] = [tree]
    while pending:
        node = pending.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append(child)
            elif not (isinstance(child, ast.If) and _is_type_checking(child)):
                pending.append(child)
    return found


def _imported(module: str, node: ast.Import | ast.ImportFrom) -> set[str]:
    """The toolkit's modules that an import statement loads."""
    if isinstance(node, ast.Import):
        names = {alias.name for alias in node.names}
    else:
        base = node.module or ""
        if node.level:
            package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
            for _ in range(node.level - 1):
                package = package.rpartition(".")[0]
            base = f"{package}.{base}" if base else package
        names = {base} | {f"{base}.{alias.name}" for alias in node.names}
    # A package is loaded before its modules: importing from it is no edge back to it.
    return {name for name in names if name in MODULES and not module.startswith(f"{name}.")}


def import_graph(*, late: bool = False) -> dict[str, set[str]]:
    """Which toolkit modules each one imports when it loads (`late`: or at any time)."""
    imports = _all_imports if late else _module_level_imports
    return {module: set().union(*(_imported(module, node) for node in imports(tree))) - {module}
            for module, tree in TREES.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _lines(node: ast.AST) -> int:
    return node.end_lineno - node.lineno + 1


def _definitions(tree: ast.Module) -> list[tuple[str, ast.AST]]:
    """Every class and function with its qualified name (Class.method, outer.inner)."""
    found: list[tuple[str, ast.AST]] = []

    def walk(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                found.append((name, child))
                walk(child, f"{name}.")
            else:
                walk(child, prefix)

    walk(tree, "")
    return found


def _offenders(kind: type | tuple[type, ...], limit: int) -> set[str]:
    return {f"{module}:{name}" for module, tree in TREES.items()
            for name, node in _definitions(tree) if isinstance(node, kind) and _lines(node) > limit}


def test_the_toolkit_is_found():
    assert {"resnet_ablate.record", "resnet_ablate.study.loop",
            "resnet_ablate.kernels._triton_impl"} <= set(MODULES)


def test_a_built_wheel_holds_every_package():
    """pyproject.toml lists the packages a wheel gets: one left out (resnet_ablate.cli was) is
    missing from a real install though an editable one still finds it in the source tree."""
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {".".join(init.parent.relative_to(ROOT).parts)
               for init in (ROOT / "resnet_ablate").rglob("__init__.py")}
    folders |= {"resnet_ablate.kernels"} if (ROOT / "kernels" / "__init__.py").exists() else set()
    assert set(config["packages"]) == folders
    assert config["package-dir"]["resnet_ablate.kernels"] == "kernels"


def test_no_import_cycle_among_the_toolkits_modules_at_any_level():
    # Imports inside functions count too: a cycle closed on first use is a cycle all the same.
    assert cycles(import_graph(late=True)) == []


def test_opening_a_study_store_loads_neither_torch_nor_ray_nor_the_trial_code():
    import subprocess
    import sys

    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, resnet_ablate.study.lease; print(sorted(m for m in "
         "('torch', 'ray', 'resnet_ablate.worker', 'resnet_ablate.trial') if m in sys.modules))"],
        capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _string_keyed(node: ast.AST) -> bool:
    """A dict written with bare string keys: `{"epoch": 3}` or `dict(epoch=3)`."""
    if isinstance(node, ast.Dict):
        return any(isinstance(k, ast.Constant) and isinstance(k.value, str) for k in node.keys)
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
        and node.func.id == "dict" and bool(node.keywords)


def _is_ray_remote(decorator: ast.AST) -> bool:
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    return isinstance(target, ast.Attribute) and target.attr == "remote"


def ray_boundary_dicts(tree: ast.Module) -> list[int]:
    """The lines where a dict with bare string keys crosses a Ray process boundary: passed to a
    `.remote(...)` call, or returned by a Ray remote function or actor method."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr == "remote":
            found += [node.lineno for arg in (*node.args, *(k.value for k in node.keywords))
                      if _string_keyed(arg)]
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and \
                any(_is_ray_remote(d) for d in node.decorator_list):
            found += [r.lineno for r in ast.walk(node) if isinstance(r, ast.Return)
                      and r.value is not None and _string_keyed(r.value)]
    return sorted(found)


def test_no_dict_with_bare_string_keys_crosses_a_ray_process_boundary():
    # Trials, outcomes and epochs cross as typed records (record.py), each with one mapping to
    # stored keys, never as dicts whose keys are spelled again on the other side.
    assert {module: lines for module, tree in TREES.items()
            if (lines := ray_boundary_dicts(tree))} == {}


def test_the_boundary_finder_finds_string_keyed_dicts_sent_or_returned():
    tree = ast.parse("""
@ray.remote
def task(x):
    return {"error": x}

@ray.remote(num_cpus=0)
class Board:
    def drain(self):
        return dict(epoch=1)

board.report.remote(1, {"epoch": 2})
board.report.remote(1, {2: "epoch"}, record)
""")
    assert ray_boundary_dicts(tree) == [4, 9, 11]


DESCRIPTIONS = tuple(f"resnet_ablate.{m}" for m in ("arch", "recipe", "spec", "record"))


def _is_description(module: str) -> bool:
    """Whether `module` belongs to the description layer (the spec package's modules too), or is
    storage.py, the store's names and paths, which it may read."""
    return module == "resnet_ablate.storage" or \
        any(module == d or module.startswith(f"{d}.") for d in DESCRIPTIONS)


def test_the_description_layer_imports_neither_the_model_layer_nor_the_driver():
    graph = import_graph()
    layer = [m for m in MODULES if _is_description(m) and m != "resnet_ablate.storage"]
    assert "resnet_ablate.spec.parse" in layer
    for module in layer:
        assert [m for m in graph[module] if not _is_description(m)] == [], module


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(f"{package}.")


def test_the_statistics_import_nothing_but_descriptions():
    # The driver (adaptive seeds) and results both ask them: they know neither a store (storage.py
    # included), nor a model, nor how a trial ran.
    graph = import_graph(late=True)
    layer = [m for m in MODULES if _within(m, "resnet_ablate.stats")]
    assert "resnet_ablate.stats.adaptive" in layer
    for module in layer:
        assert [m for m in graph[module]
                if not _within(m, "resnet_ablate.stats")
                and (not _is_description(m) or m == "resnet_ablate.storage")] == [], module


# What runs a study or trains a trial: results read the store and never reach them.
TRAINING = tuple(f"resnet_ablate.{m}" for m in (
    "train", "trial", "execution", "replicas", "worker", "data_parallel", "board", "study", "cli"))


def test_results_read_the_store_and_never_train():
    graph = import_graph(late=True)
    layer = [m for m in MODULES if _within(m, "resnet_ablate.results")]
    assert "resnet_ablate.results.report" in layer
    for module in layer:
        assert [m for m in graph[module] if any(_within(m, t) for t in TRAINING)] == [], module
    # Only the analyses that reload a trained model (Fig. 7) know the model layer at all.
    model_layer = ("resnet_ablate.models", "resnet_ablate.kernels", "resnet_ablate.data")
    assert {module for module in layer if any(_within(m, t) for m in graph[module]
                                               for t in model_layer)} == {
        "resnet_ablate.results.analysis"}


def test_only_the_command_line_reads_results():
    graph = import_graph(late=True)
    readers = {module for module, imported in graph.items()
               if not _within(module, "resnet_ablate.results")
               and any(_within(m, "resnet_ablate.results") for m in imported)}
    assert readers == {"resnet_ablate.cli.output", "resnet_ablate.cli.query",
                       "resnet_ablate.cli.run"}


def _long_modules() -> set[str]:
    return {name for name, path in MODULES.items()
            if len(path.read_text().splitlines()) > MAX_MODULE_LINES}


def _long_functions() -> set[str]:
    return _offenders((ast.FunctionDef, ast.AsyncFunctionDef), MAX_FUNCTION_LINES)


def test_no_module_over_400_lines_but_the_listed_ones():
    assert _long_modules() - LONG_MODULES == set()


def test_no_class_over_250_lines_but_the_listed_ones():
    assert _offenders(ast.ClassDef, MAX_CLASS_LINES) - LONG_CLASSES == set()


def test_no_function_over_60_lines_but_the_listed_ones():
    assert _long_functions() - LONG_FUNCTIONS == set()


def test_every_listed_offender_still_offends_so_the_list_only_shrinks():
    # A split (or renamed, or deleted) offender must leave the list in the same change; otherwise
    # the entry would quietly allow a new offender of that name to grow back.
    assert LONG_MODULES - _long_modules() == set()
    assert LONG_CLASSES - _offenders(ast.ClassDef, MAX_CLASS_LINES) == set()
    assert LONG_FUNCTIONS - _long_functions() == set()


def test_every_test_the_readme_names_exists():
    """README's fault table names the test that holds each row (`module::test_name`): a renamed
    or removed test would leave a guarantee held by nothing."""
    readme = (ROOT / "README.md").read_text()
    named = re.findall(r"`(\w+)::(test_\w+)`", readme)
    assert len(named) > 20
    missing = [f"{module}::{name}" for module, name in named
               if f"def {name}(" not in (ROOT / "tests" / f"test_{module}.py").read_text()]
    assert not missing, missing
