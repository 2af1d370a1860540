"""The package's layout, read from its source: which ddpm module imports which.

Every import statement counts, at the top of a module or inside a function, so that a "lazy" import made to
dodge a cycle is still an edge of the graph. The direction wanted (issue 17): config and the maths at the
bottom, data and model folders above them, training and the command-line modules (ddpm/train.py,
ddpm/sample_cli.py, run by `ddpm-train`, `ddpm-sample` and the clone's train.py and sample.py) on top.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("train", "sample")  # the clone's wrappers of the CLIs: nothing in ddpm may reach them
# The command-line modules, at the top of the layout: no ddpm module imports them.
CLI_MODULES = ("ddpm.train", "ddpm.sample_cli")
# Modules above config: config is what they read, so config importing one of them closes a cycle.
ABOVE_CONFIG = ("ddpm.data", "ddpm.inference", "ddpm.training", "ddpm.fid", "ddpm.run_dir", "ddpm.interop")
# What the network may not depend on: it is loaded, converted and trained by these, never the other way.
ABOVE_NETWORK = ("ddpm.io", "ddpm.inference", "ddpm.training", "ddpm.interop")


def test_no_import_cycle():
    found = cycles(GRAPH)
    assert not found, "import cycles: " + "; ".join(" -> ".join(cycle) for cycle in found)


def test_no_module_reaches_the_scripts():
    problems = []
    for name, (path, tree) in MODULES.items():
        found = imports(name, tree, set(MODULES), package=path.name == "__init__.py")
        scripts = sorted(m for m in found if m.split(".")[0] in SCRIPTS or m in CLI_MODULES)
        problems += [f"{name} imports {script}" for script in scripts]
        problems += [f"{name}:{line} loads {file}" for line, file in script_loads(tree)]
    for path in [*(ROOT / "ddpm").rglob("*.py"), *(ROOT / "tests").rglob("*.py")]:
        tree = ast.parse(path.read_text(), filename=str(path))
        problems += [f"{path.relative_to(ROOT)}:{line} uses sys.path" for line in sys_path_uses(tree)]
    assert not problems, "; ".join(problems)


def test_only_python_m_ddpm_imports_the_ddpm_command():
    """ddpm.cli runs every command (importing only the one it runs, by its module's name): it is the top of
    the layout."""
    importers = sorted(name for name, found in GRAPH.items() if "ddpm.cli" in found)
    assert importers == ["ddpm.__main__"], f"{importers} import ddpm.cli, the `ddpm` command"


def test_no_module_imports_the_likelihood_cli():
    """ddpm.nll loads models (it sits above ddpm.inference): a module below importing it closes a cycle."""
    importers = sorted(name for name, found in GRAPH.items() if "ddpm.nll" in found)
    assert not importers, f"{importers} import ddpm.nll, the likelihood CLI at the top of the layout"


def test_the_clone_scripts_only_run_the_package_commands():
    # The CLIs live in the package, so that an installed ddpm has them: the clone's scripts only call them.
    for script, cli in zip(SCRIPTS, CLI_MODULES, strict=True):
        tree = ast.parse((ROOT / f"{script}.py").read_text())
        assert imports(script, tree, set(MODULES)) == {cli}, f"{script}.py imports more than {cli}"
        assert len(tree.body) == 3, f"{script}.py: a docstring, the import of main and the call, nothing else"


def test_config_imports_nothing_above_it():
    above = sorted(m for m in GRAPH["ddpm.config"] if within(m, ABOVE_CONFIG))
    assert not above, f"ddpm.config imports {above}: move what it needs from them into config (or below)"


def test_the_network_holds_only_the_network():
    name = "ddpm.models.unet"
    above = sorted(m for m in GRAPH[name] if within(m, ABOVE_NETWORK))
    path, tree = MODULES[name]
    functions = sorted(
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and any(word in node.name for word in ("save", "load", "pretrained"))
    )
    assert not above and not functions, f"{name} imports {above} and holds save/load functions {functions}"


# -- the guard's own parts, on small made-up modules: the tests above pass only if these can see a problem


def test_imports_are_found_inside_functions_and_relative_ones_resolved():
    source = (
        "import os\nfrom .. import io\ndef f():\n    from ddpm.data import DATASETS\n    import ddpm.fid\n"
    )
    ours = {"ddpm", "ddpm.io", "ddpm.data", "ddpm.fid", "ddpm.models", "ddpm.models.unet"}
    found = imports("ddpm.models.unet", ast.parse(source), ours)
    assert found == {"os", "ddpm.io", "ddpm.data", "ddpm.fid"}
    assert imports("ddpm.models", ast.parse("from .unet import UNet\n"), ours, package=True) == {
        "ddpm.models.unet"
    }
    assert imports("ddpm.models.unet", ast.parse("from . import layers\n"), ours) == {"ddpm.models"}


def test_cycles_are_reported_with_their_path():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_script_loads_and_sys_path_uses_are_found():
    source = (
        "import sys, importlib.util, runpy\n"
        "def f():\n"
        "    sys.path.insert(0, '..')\n"
        "    importlib.util.spec_from_file_location('t', ROOT / 'train.py')\n"
        "    runpy.run_path('sample.py')\n"
        "    print('see train.py')\n"
    )
    tree = ast.parse(source)
    assert sys_path_uses(tree) == [3]
    assert script_loads(tree) == [(4, "train.py"), (5, "sample.py")]


# -- reading the source


def module_name(path: Path) -> str:
    """ddpm/models/unet.py -> ddpm.models.unet; a package's __init__.py is the package."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(name: str, tree: ast.Module, ours: set[str], *, package: bool = False) -> set[str]:
    """Every module that `tree`, the source of module `name` (a package: its __init__.py), imports anywhere
    in it, as absolute names. `from p import x` is an import of p.x where that is one of `ours`, else of p.
    """
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative to the package of `name`, up level - 1 packages
                parts = name.split(".") if package else name.split(".")[:-1]
                base = ".".join(filter(None, [*parts[: len(parts) - node.level + 1], base]))
            submodules = {f"{base}.{alias.name}" for alias in node.names} & ours
            found.update(submodules or {base})
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a path that ends where it starts) for each edge back into the path being followed."""
    found, state, path = [], {}, []

    def visit(node: str) -> None:
        state[node] = "on path"
        path.append(node)
        for successor in sorted(graph.get(node, ())):
            if state.get(successor) == "on path":
                found.append([*path[path.index(successor) :], successor])
            elif successor not in state:
                visit(successor)
        path.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def script_loads(tree: ast.Module) -> list[tuple[int, str]]:
    """(line, file) of each call that loads train.py or sample.py by its path (importlib, runpy)."""
    loaders = ("spec_from_file_location", "run_path", "run_module", "import_module", "__import__")
    found = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) in loaders
        ):
            for constant in ast.walk(node):
                if isinstance(constant, ast.Constant) and constant.value in [f"{s}.py" for s in SCRIPTS]:
                    found.append((node.lineno, constant.value))
    return sorted(found)


def sys_path_uses(tree: ast.Module) -> list[int]:
    return sorted(
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and node.attr == "path"
        and isinstance(node.value, ast.Name)
        and node.value.id == "sys"
    )


def within(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(f"{p}.") for p in packages)


def import_graph() -> dict[str, set[str]]:
    """Module -> the ddpm modules it imports (a package's __init__ running first is not counted)."""
    ours = set(MODULES)
    return {
        name: imports(name, tree, ours, package=path.name == "__init__.py") & ours - {name}
        for name, (path, tree) in MODULES.items()
    }


MODULES = {
    module_name(path): (path, ast.parse(path.read_text(), filename=str(path)))
    for path in sorted((ROOT / "ddpm").rglob("*.py"))
}
GRAPH = import_graph()
