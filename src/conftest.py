"""`make test` runs the doctests of every module under src/ (the examples in docstrings must stay true)."""

from __future__ import annotations

from _pytest.doctest import DoctestModule


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name != "conftest.py":
        return DoctestModule.from_parent(parent, path=file_path)
    return None
