"""tools/import_graph.py: the cycle check CI runs (``make check``), on tiny synthetic packages."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tool():
    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "tools" / "import_graph.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["import_graph"] = module  # dataclasses look the module up while building Edge
    spec.loader.exec_module(module)
    return module


graph = _tool()


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "pkg"
    for name, text in {"__init__.py": "", **files}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_a_three_module_cycle_fails(tmp_path, capsys):
    root = _package(tmp_path, {"a.py": "from pkg import b\n", "b.py": "import pkg.c\n",
                               "c.py": "from . import a\n"})
    assert graph.main([str(root)]) == 1
    out = capsys.readouterr()
    assert "3 modules: pkg.a, pkg.b, pkg.c" in out.out
    assert "pkg.c:1 -> pkg.a" in out.out
    assert "a cycle of 3 modules" in out.err


def test_no_cycle_passes(tmp_path, capsys):
    root = _package(tmp_path, {"a.py": "from pkg.b import x\n", "b.py": "import os\nx = 1\n",
                               "sub/__init__.py": "", "sub/c.py": "from ..a import *\n"})
    assert graph.main([str(root)]) == 0
    assert "module-level imports: 0 cycle(s)" in capsys.readouterr().out


def test_two_module_cycle_is_allowed_by_default_but_not_with_max_1(tmp_path):
    root = _package(tmp_path, {"a.py": "import pkg.b\n", "b.py": "import pkg.a\n"})
    assert graph.main([str(root)]) == 0
    assert graph.main([str(root), "--max", "1"]) == 1


@pytest.mark.parametrize(("closing", "fails_with_all"), [
    ("def f():\n    from pkg import a\n", True),  # a function-level import: counted by --all only
    ("def f():\n    return 'pkg.a:NAME'\n", True),  # a module named by string, imported on use
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n", False),  # never runs
])
def test_function_level_imports_count_only_with_all(tmp_path, closing, fails_with_all):
    root = _package(tmp_path, {"a.py": "from pkg import b\n", "b.py": "from pkg import c\n", "c.py": closing})
    assert graph.main([str(root)]) == 0
    assert graph.main([str(root), "--all"]) == (1 if fails_with_all else 0)


def test_importing_a_name_from_a_package_points_at_the_package_not_a_submodule(tmp_path):
    root = _package(tmp_path, {"__init__.py": "X = 1\n", "a.py": "from pkg import X\n"})
    assert {(e.source, e.target) for e in graph.edges(root)} == {("pkg.a", "pkg")}


def test_tunelab_has_no_cycle_longer_than_two_modules():
    assert graph.main([str(ROOT / "src" / "tunelab")]) == 0


def test_tunelab_has_no_cycle_longer_than_two_modules_with_function_level_imports_too():
    """What `make imports` checks (--all): the adapter loader's recursion (init_from -> any method) and the
    adapters' capabilities run through arguments, not through imports of the registry."""
    assert graph.main([str(ROOT / "src" / "tunelab"), "--all"]) == 0


def test_config_imports_the_methods_one_way_and_function_level_cycles_stay_inside_methods():
    """The registry and the method modules never import config, run or prepare (not even in a function), and
    no method module imports the registry or the loader (io), not even in a function."""
    package = ROOT / "src" / "tunelab"
    edges = graph.edges(package)
    upward = [e for e in edges if e.source.startswith("tunelab.methods")
              and e.target in {"tunelab.config", "tunelab.run", "tunelab.prepare"}]
    assert upward == []
    assert any(e.source == "tunelab.config" and e.target == "tunelab.methods" and not e.lazy for e in edges)
    cycles = graph.components(graph.modules(package), graph.graph_of(edges, lazy=True))
    assert [c for c in cycles if len(c) > 2] == []
    inward = [e for e in edges if e.source.startswith("tunelab.methods.") and e.source != "tunelab.methods.io"
              and e.target in {"tunelab.methods", "tunelab.methods.io"}]
    assert inward == []
