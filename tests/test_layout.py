"""The layout's promises, checked: `quant` stays a torch-only library, nothing patches sys.path or the environment
at import, modules and functions stay readable in one sitting, and no module imports itself back."""
import ast
import subprocess
import sys

from lab.resources import ROOT

PACKAGES = ("quant", "lab", "bench", "demo_model")
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80


def python_files():
    return [ROOT / "app.py"] + [path for package in PACKAGES + ("tests",) for path in (ROOT / package).rglob("*.py")]


def test_quant_imports_none_of_the_app_stack():
    code = ("import sys, quant; heavy = ('stable_audio_tools', 'gradio', 'librosa', 'plotly'); "
            "print(sorted({m.split('.')[0] for m in sys.modules if m.split('.')[0] in heavy}))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert loaded.stdout.strip() == "[]"


def test_nothing_patches_sys_path():
    needle = "sys.path." + "insert"  # split so this file does not match itself
    patched = [p.relative_to(ROOT).as_posix() for p in python_files()
               if needle in p.read_text() or "sys.path." + "append" in p.read_text()]
    assert patched == []


def test_no_module_is_over_the_line_budget():
    long = {p.relative_to(ROOT).as_posix(): n for p in python_files()
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert long == {}


def package_modules() -> dict[str, tuple[ast.Module, bool]]:
    """Module name -> (parsed source, whether it is a package's __init__), for app.py and the packages."""
    modules = {"app": (ast.parse((ROOT / "app.py").read_text()), False)}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            is_package = parts[-1] == "__init__"
            modules[".".join(parts[:-1] if is_package else parts)] = (ast.parse(path.read_text()), is_package)
    return modules


def test_no_function_is_over_the_line_budget():
    long = [f"{name}.{node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for name, (tree, _) in package_modules().items() for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert long == []


def test_no_module_changes_the_environment_at_import():
    """Top-level statements only (functions may, e.g. a main() setting OMP_WAIT_POLICY before torch loads)."""
    writes = ("os.environ.setdefault", "os.environ.update", "os.putenv")  # and os.environ[...] = ... below
    changed = [name for name, (tree, _) in package_modules().items() for node in tree.body
               if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
               and (any(isinstance(target, ast.Subscript) and ast.unparse(target.value) == "os.environ"
                        for inner in ast.walk(node) if isinstance(inner, (ast.Assign, ast.AugAssign))
                        for target in getattr(inner, "targets", [getattr(inner, "target", None)]))
                    or any(write in ast.unparse(node) for write in writes))]
    assert changed == []


def module_imports(name: str, tree: ast.Module, is_package: bool, known: set[str]) -> set[str]:
    """The project modules `name` imports at module level (not inside functions)."""
    found = set()
    for node in tree.body:
        for inner in ast.walk(node) if isinstance(node, (ast.If, ast.Try)) else [node]:
            if isinstance(inner, ast.Import):
                found |= {alias.name for alias in inner.names if alias.name in known}
            elif isinstance(inner, ast.ImportFrom):
                base = inner.module or ""
                if inner.level:  # relative: from the module's package, up level - 1
                    package = name.split(".") if is_package else name.split(".")[:-1]
                    base = ".".join(package[:len(package) - inner.level + 1] + ([base] if base else []))
                for alias in inner.names:
                    full = f"{base}.{alias.name}"
                    found |= {full} if full in known else ({base} if base in known else set())
    return found - {name}


def import_cycles(graph: dict[str, set[str]]) -> list[str]:
    """Every cycle a depth-first walk of the import graph closes, as "a -> b -> a"."""
    state, cycles = {}, []

    def visit(name, path):
        state[name] = "open"
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    return cycles


def test_no_module_level_import_cycle():
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a -> b -> c -> a"]  # the check finds one
    modules = package_modules()
    graph = {name: module_imports(name, tree, is_package, set(modules)) for name, (tree, is_package) in modules.items()}
    assert sum(map(len, graph.values())) > 100  # it sees the imports (relative ones included)
    assert import_cycles(graph) == []
