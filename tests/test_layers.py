"""The three layers of docs/architecture.md, checked on the imports of every library module.

The method imports only torch, open_clip, numpy and other method modules; the pipeline imports the
method and the pipeline; the notebook/report helpers import anything in the library. Nothing in
the library imports a script (``data_prep``, ``benchmarks``) or a test. Imports stand at the top of
a module: a module may import library modules inside functions only when docs/architecture.md's
"Lazy imports" table names it with the measured reason, and a third-party import inside a
function says why in a comment on its line or right above it. Top-level imports between library modules form no cycle.
"""
from __future__ import annotations

import ast
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Set

ROOT = Path(__file__).resolve().parents[1]
ARCHITECTURE = ROOT / "docs" / "architecture.md"
LAYERS = ("method", "pipeline", "report")
METHOD_THIRD_PARTY = {"torch", "open_clip", "numpy", "einops"}
SCRIPTS = {"data_prep", "benchmarks", "tests", "notebooks"}
ROW = re.compile(r"^\|\s*`(?P<file>[\w/]+\.py)`\s*\|\s*(?P<cell>[^|]+?)\s*\|\s*(?P<rest>.+?)\s*\|\s*$")


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, dotted ("reclip_core.rectify")
    target: str  # what it imports, dotted and absolute ("reclip_core.config", "torch.nn")
    top: bool  # at module level (not inside a function or class body)
    line: int
    commented: bool  # a comment on the line or right above it says why it is here


def module_name(path: Path, package_root: Path) -> str:
    parts = list(path.relative_to(package_root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, package_root: Path) -> List[Import]:
    """Every import statement of a file, relative imports made absolute."""
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    tree = ast.parse(text)
    mod = module_name(path, package_root)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    top_ids = {id(n) for n in tree.body}
    for node in tree.body:  # imports under a module-level try/if count as top level
        if isinstance(node, (ast.Try, ast.If)):
            top_ids |= {id(n) for n in ast.walk(node)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # "from . import x" / "from pkg import submodule": the submodule is the target
            targets = [f"{base}.{a.name}" if not node.module or _is_package(base, package_root) else base
                       for a in node.names]
        else:
            continue
        out += [Import(mod, t, id(node) in top_ids, node.lineno, _says_why(lines, node.lineno)) for t in targets]
    return out


def _says_why(lines: List[str], lineno: int) -> bool:
    """A comment on the import's line, on an import line of the same block, or right above the block."""
    k = lineno - 1
    while k >= 0:
        text = lines[k].strip()
        if "#" in text:
            return True
        if not text.startswith(("import ", "from ")):
            return False
        k -= 1
    return False


def _is_package(dotted: str, package_root: Path) -> bool:
    if not dotted.startswith(package_root.name):
        return False
    rel = dotted.split(".")[1:]
    return package_root.joinpath(*rel).is_dir()


def _owner(target: str, modules: Set[str]) -> str:
    """The library module a dotted target names (``reclip_core.datasets.names.X`` → its module)."""
    while target and target not in modules:
        target = target.rpartition(".")[0]
    return target


def read_layers(doc: Path) -> Dict[str, str]:
    """``{file relative to reclip_core: layer}`` from the "Layers" table of the architecture doc."""
    layers, section = {}, None
    for line in doc.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            section = line[3:].strip().lower()
        m = ROW.match(line)
        if m and section == "layers" and m["cell"] in LAYERS:
            layers[m["file"]] = m["cell"]
    return layers


def read_lazy(doc: Path) -> Set[str]:
    """Files the "Lazy imports" table allows to import library modules inside functions."""
    lazy, section = set(), None
    for line in doc.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            section = line[3:].strip().lower()
        m = ROW.match(line)
        if m and section == "lazy imports":
            lazy.add(m["file"])
    return lazy


def violations(package_root: Path, layers: Dict[str, str], lazy: Set[str]) -> List[str]:
    """Every breach of the rules above in the package at ``package_root``, one line each."""
    files = {p.relative_to(package_root).as_posix(): p for p in sorted(package_root.rglob("*.py"))}
    problems = [f"{f}: not in the Layers table of docs/architecture.md" for f in files if f not in layers]
    problems += [f"{f}: in the Layers table but not in the package" for f in layers if f not in files]
    mods = {module_name(p, package_root): f for f, p in files.items()}
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    graph: Dict[str, Set[str]] = {m: set() for m in mods}
    for f, path in files.items():
        layer = layers.get(f)
        for imp in imports_of(path, package_root):
            head = imp.target.split(".")[0]
            where = f"{f}:{imp.line} imports {imp.target}"
            if head in SCRIPTS:
                problems.append(f"{where}: the library never imports scripts or tests")
            elif head == package_root.name:
                owner = _owner(imp.target, set(mods))
                dep = layers.get(mods.get(owner, ""))
                if layer == "method" and dep != "method":
                    problems.append(f"{where}: a method module imports only torch/open_clip/numpy and the method")
                if layer == "pipeline" and dep == "report":
                    problems.append(f"{where}: the pipeline never imports the report layer")
                if not imp.top and f not in lazy:
                    problems.append(f"{where} inside a function: move it to the top (or list the module with "
                                    "its measured reason under 'Lazy imports')")
                if imp.top and owner in graph and owner != imp.module:
                    graph[imp.module].add(owner)
            else:
                if layer == "method" and head not in stdlib and head not in METHOD_THIRD_PARTY:
                    problems.append(f"{where}: a method module imports only torch/open_clip/numpy")
                if not imp.top and head not in stdlib and not imp.commented and f not in lazy:
                    problems.append(f"{where} inside a function without a comment saying why (measured import time)")
    problems += [f"import cycle: {' -> '.join(c)}" for c in _cycles(graph)]
    return list(dict.fromkeys(problems))  # one line per breach, in file order


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    found, state = [], {}

    def visit(node: str, stack: List[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


# ------------------------------------------------------------------------------------------------
def test_the_library_keeps_its_layers():
    problems = violations(ROOT / "reclip_core", read_layers(ARCHITECTURE), read_lazy(ARCHITECTURE))
    assert not problems, "\n".join(problems)


def _package(tmp_path: Path, files: Dict[str, str]) -> Path:
    root = tmp_path / "reclip_core"
    for name, text in {"__init__.py": "", **files}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


LAYOUT = {"__init__.py": "report", "rectify.py": "method", "config.py": "pipeline", "lab.py": "report"}


def test_a_method_module_importing_the_pipeline_fails(tmp_path):
    root = _package(tmp_path, {"rectify.py": "import torch\nfrom .config import X\n", "config.py": "import yaml\n",
                               "lab.py": "from .config import X\n"})
    problems = violations(root, LAYOUT, set())
    assert len(problems) == 1 and "rectify.py:2 imports reclip_core.config: a method module" in problems[0]


def test_a_method_module_importing_another_library_fails(tmp_path):
    root = _package(tmp_path, {"rectify.py": "import pandas\n", "config.py": "", "lab.py": ""})
    assert [p for p in violations(root, LAYOUT, set()) if "rectify.py:1 imports pandas" in p]


def test_the_pipeline_importing_a_report_helper_or_a_script_fails(tmp_path):
    root = _package(tmp_path, {"rectify.py": "", "config.py": "from . import lab\nimport data_prep.toyworld\n",
                               "lab.py": ""})
    problems = violations(root, LAYOUT, set())
    assert any("never imports the report layer" in p for p in problems)
    assert any("never imports scripts" in p for p in problems)


def test_imports_inside_functions_need_a_listed_reason(tmp_path):
    body = "def f():\n    from .rectify import g\n    import seaborn\n    import pandas  # 0.4 s to import\n"
    root = _package(tmp_path, {"rectify.py": "", "config.py": body, "lab.py": ""})
    problems = violations(root, LAYOUT, set())
    assert len(problems) == 2 and "config.py:2" in problems[0] and "config.py:3 imports seaborn" in problems[1]
    assert violations(root, LAYOUT, {"config.py"}) == []


def test_an_import_cycle_and_an_unlisted_module_fail(tmp_path):
    root = _package(tmp_path, {"rectify.py": "", "config.py": "from .lab import x\n", "lab.py": "from .config import y\n",
                               "extra.py": ""})
    problems = violations(root, dict(LAYOUT, **{"config.py": "report"}), set())
    assert "extra.py: not in the Layers table of docs/architecture.md" in problems
    assert any(p.startswith("import cycle: reclip_core.config -> reclip_core.lab -> reclip_core.config") for p in problems)
