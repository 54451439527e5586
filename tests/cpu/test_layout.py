"""The package's layout: the import graph of every module of ``lineas_fast`` and
``lineas_fast.kernels`` (relative and absolute self-imports, at module level or inside
functions) has no cycle, and each layer imports only from the layers below it:

    kernels  <  base (the top-level modules)  <  training, fold  <  serve, apps  <  cli

(``lineas_fast/__init__.py``, the public API, sits outside the order: nothing in the package
imports it at module level. ``lineas_fast/__main__.py``, ``python -m lineas_fast``, is the
command line's entry point and sits in its layer.)"""

import ast
import pathlib

import lineas_fast as lf

PACKAGE = pathlib.Path(lf.__file__).parent
LAYER = {"kernels": 0, "": 1, "training": 2, "fold": 2, "serve": 3, "apps": 3, "cli": 4, "__main__": 4}


def module_files() -> dict[str, pathlib.Path]:
    """{dotted module name: file} for every module of the package, kernels included."""
    import lineas_fast.kernels as kernels

    out = {}
    for root, prefix in (
        (PACKAGE, "lineas_fast"),
        (pathlib.Path(kernels.__file__).parent, "lineas_fast.kernels"),
    ):
        for p in root.rglob("*.py"):
            parts = list(p.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([prefix, *parts])] = p
    return out


def imported(name: str, path: pathlib.Path, known: set[str], is_package: bool) -> list[tuple[str, bool]]:
    """[(module of the package imported, at module level?)] for every import in the file."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    base = name.split(".") if is_package else name.split(".")[:-1]
    out = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                mod = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t:
                out.append((t, id(node) in top))
    return out


def layer_of(module: str) -> int:
    parts = module.split(".")
    if parts[1] == "kernels":
        return LAYER["kernels"]
    return LAYER[parts[1]] if len(parts) > 1 and parts[1] in LAYER else LAYER[""]


def graph(module_level_only: bool) -> dict[str, set[str]]:
    files = module_files()
    known = set(files)
    return {
        m: {t for t, top in imported(m, p, known, p.name == "__init__.py") if top or not module_level_only}
        - {m}
        for m, p in files.items()
    }


def test_the_layout_has_the_documented_subpackages():
    files = module_files()
    for sub in ("training", "fold", "serve", "apps", "cli", "kernels"):
        assert f"lineas_fast.{sub}" in files, sub


def test_no_import_cycles_lazy_imports_included():
    g = {
        m: deps - {"lineas_fast"} for m, deps in graph(module_level_only=False).items() if m != "lineas_fast"
    }
    # a package's __init__ importing its own submodules is not a cycle through them
    state = {}

    def visit(m, path):
        if state.get(m) == "open":
            raise AssertionError(f"import cycle: {' -> '.join(path + [m])}")
        if state.get(m) == "done" or m not in g:
            return
        state[m] = "open"
        for dep in sorted(g[m]):
            if not dep.startswith(m + "."):
                visit(dep, path + [m])
        state[m] = "done"

    for m in sorted(g):
        visit(m, [])


def test_nothing_imports_the_public_api_at_module_level():
    offenders = sorted(m for m, deps in graph(module_level_only=True).items() if "lineas_fast" in deps)
    assert offenders == [], f"modules importing `lineas_fast` itself at module level: {offenders}"


def test_each_layer_imports_only_from_layers_below():
    wrong = []
    for m, deps in graph(module_level_only=False).items():
        if m == "lineas_fast":
            continue
        for d in deps:
            if d != "lineas_fast" and layer_of(d) > layer_of(m):
                wrong.append(f"{m} -> {d}")
    assert wrong == [], "imports against the layer order:\n" + "\n".join(sorted(wrong))
