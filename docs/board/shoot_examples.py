"""Screenshot the board's Examples view on a real store: where two methods disagree on one task.

    python docs/board/shoot_examples.py --runs runs --store paper_e2e/results.sqlite --task e2e \
        --a pt --b ipt --out docs/board/examples_paper_e2e.png

Serves the board on a free loopback port, opens Examples in headless Chromium (the system one), picks the
store and task, filters "methods disagree", sorts by |score A - score B| and saves the screenshot; prints
the count line and the first rows (both predictions and the demonstration) as the data functions see them.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from playwright import sync_api

from tunelab.board import examples
from tunelab.board.app import serve
from tunelab.board.stores import store_rows
from tunelab.serve.local import free_port

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]


def pick(page, elem: str, option: str) -> None:
    if page.locator(f"#{elem} input").input_value() == option:
        return
    page.locator(f"#{elem} input").click()
    page.get_by_role("option", name=option, exact=True).click()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", default="runs")
    ap.add_argument("--store", required=True, help="store path relative to --runs")
    ap.add_argument("--task", required=True)
    ap.add_argument("--a", required=True, help="method setting A (as the A dropdown lists it)")
    ap.add_argument("--b", required=True)
    ap.add_argument("--out", default="docs/board/examples_real.png")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    args = ap.parse_args()

    rows = store_rows(Path(args.runs) / args.store)
    data = examples.load_task_examples(rows, args.task)
    a = next(m for m in data.methods if m.startswith(args.a))
    b = next(m for m in data.methods if m.startswith(args.b))
    shown = examples.select(data, [a, b], "methods disagree", a, b, sort_by_difference=True)
    print(f"{len(shown)} of {len(data.order)} {args.task} examples: {a} and {b} disagree")
    frame = examples.example_frame(data, shown[:3], [a, b])
    for record in frame.to_dict("records"):
        print("")
        for key, value in record.items():
            print(f"  {key}: {value}")

    port = free_port()
    demo_app = serve(Path(args.runs), port=port, block=False)
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1500, "height": 1300})
            page.set_default_timeout(120_000)
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_selector("#tab-results", state="attached")
            page.get_by_role("tab", name="Examples").click()
            pick(page, "examples-store", args.store)
            pick(page, "examples-task", args.task)
            pick(page, "examples-a", a)
            pick(page, "examples-b", b)
            page.get_by_label("methods disagree").check()
            page.locator("#examples-sort input").check()
            sync_api.expect(page.locator("#examples-count")).to_contain_text(f"of {len(data.order)}")
            time.sleep(2)
            print("\nboard:", page.locator("#examples-count").inner_text())
            page.screenshot(path=args.out, full_page=True)
            print("saved", args.out)
            browser.close()
    finally:
        demo_app.close()


if __name__ == "__main__":
    main()
