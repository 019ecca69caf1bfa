"""docs/design.md names every module under src/tunelab (issue 30: the module map is the whole tree)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_design_names_every_module():
    text = (ROOT / "docs" / "design.md").read_text()
    src = ROOT / "src" / "tunelab"
    missing = [str(p.relative_to(src)) for p in sorted(src.rglob("*.py"))
               if p.name != "__init__.py" and p.stem not in text and p.name not in text]
    assert not missing, f"docs/design.md does not name: {', '.join(missing)}"
