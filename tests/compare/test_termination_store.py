"""A grid's report shows whether answers ended, and the backfill estimates it for cells stored before."""

from __future__ import annotations

import json


def test_a_grid_report_has_the_section_and_backfill_agrees_with_what_cells_recorded(tiny_report, tmp_path):
    """The tiny grid's cells record their termination (every answer cut: 4 tokens, a random model); with the
    records removed, the backfill's estimate from the stored predictions gives the same counts."""
    import shutil
    import sqlite3

    from tunelab.compare.backfill import backfill
    from tunelab.compare.store import Store

    assert "## Termination" in tiny_report.report_md.read_text()
    copy = tmp_path / "results.sqlite"
    shutil.copy(tiny_report.store, copy)
    with Store(copy) as db:
        recorded = {r.key: r.data["result"]["eval"]["termination"] for r in db.rows(status="done")}
        assert recorded and all(t["at_limit"] == t["answers"] > 0 for t in recorded.values())
    conn = sqlite3.connect(copy)
    for key, (text,) in ((k, conn.execute("SELECT result FROM cells WHERE key = ?", (k,)).fetchone()) for k in recorded):
        result = json.loads(text)
        del result["eval"]["termination"]
        conn.execute("UPDATE cells SET result = ? WHERE key = ?", (json.dumps(result), key))
    conn.commit()
    conn.close()
    with Store(copy) as db:
        assert backfill(db) == len(recorded)
        estimated = {r.key: r.data["result"]["eval"]["termination"] for r in db.rows(status="done")}
        assert backfill(db) == 0  # recorded (or estimated) cells are left alone
    for key, found in estimated.items():
        assert found.pop("estimated") is True
        assert found == recorded[key]
