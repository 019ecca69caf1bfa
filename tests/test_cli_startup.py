"""Start-up and config errors: every check that needs no model answers without importing torch & co.

A structural check, not a timing: one subprocess imports the CLI, runs each command below and reports
which heavy libraries ended up in ``sys.modules`` (torch alone takes seconds to import).
"""

import json
import os
import subprocess
import sys

HEAVY = ("torch", "transformers", "peft", "gradio", "ray")

DRIVER = """
import io, json, sys
from contextlib import redirect_stdout
from tunelab.cli import main
results = []
for args in json.loads(sys.argv[1]):
    sys.argv = ["tunelab", *args]
    out = io.StringIO()
    code = 0
    try:
        with redirect_stdout(out):
            main()
    except SystemExit as exc:
        code = exc.code or 0
    results.append({"args": args, "code": code, "out": out.getvalue()})
print(json.dumps({"results": results, "heavy": [m for m in HEAVY if m in sys.modules]}))
""".replace("HEAVY", repr(HEAVY))


def _drive(commands: list[list[str]], cwd) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "80"}
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(commands)], capture_output=True, text=True,
                          env=env, timeout=300, cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def test_config_errors_and_listings_import_no_heavy_library(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "runs").mkdir()
    commands = [
        ["--help"],
        ["run", "--method", "prompt_tunning"],
        ["run", "--task", "data/nosuch.jsonl"],
        ["run", "train.lr=-1"],
        ["run", "--resume", "--restart"],
        ["run", "--method", "lora", "method.r=0"],
        ["eval", "--data", "nosuch.jsonl"],
        ["eval", "--data", "empty.jsonl", "data.max_evl=3"],
        ["serve", "--adapters", "runs", "--port", "99999"],
        ["compare", "--preset", "quick", "nosuch.key=1"],
        ["report", "runs"],
        ["data", "inspect", "empty.jsonl"],
        ["ls", "methods"],
        ["ls", "tasks"],
        ["ls", "models"],
        ["ls"],
    ]
    seen = _drive(commands, tmp_path)
    assert seen["heavy"] == [], f"imported before any model was needed: {seen['heavy']}"
    by_args = {" ".join(r["args"]): r for r in seen["results"]}
    for args, result in by_args.items():
        expected = 0 if args in ("--help", "ls methods", "ls tasks", "ls models", "ls") else 2
        assert result["code"] == expected, (args, result)
    typo = by_args["run --method prompt_tunning"]["out"]
    assert "did you mean 'prompt_tuning'?" in typo and len(typo.strip().splitlines()) == 1
    assert "file not found: data/nosuch.jsonl" in by_args["run --task data/nosuch.jsonl"]["out"]
    assert "did you mean 'data.max_eval'?" in by_args["eval --data empty.jsonl data.max_evl=3"]["out"]
    assert "--preset quick --out DIR" in by_args["report runs"]["out"]
    assert "no examples" in by_args["data inspect empty.jsonl"]["out"]


def test_piped_tables_are_not_cut_to_80_columns(tmp_path):
    """`tunelab ls methods | grep instruction_tuning` finds the whole row: no `instruction_tun…`."""
    seen = _drive([["ls", "methods"]], tmp_path)
    rows = [line for line in seen["results"][0]["out"].splitlines() if "instruction_tuning" in line]
    assert rows and "changes_weights, low_rank_delta" in rows[0], seen["results"][0]["out"]
    assert "…" not in seen["results"][0]["out"]


def test_demo_does_not_write_into_the_folder_make_demo_uses():
    """`tunelab demo` wrote runs/demo, where `make demo` keeps the comparison grid's store and report."""
    import inspect
    import re
    from pathlib import Path

    from tunelab.demo import run_demo

    makefile = (Path(__file__).parents[1] / "Makefile").read_text()
    grid_out = re.search(r"tunelab compare --preset quick --out (\S+)", makefile).group(1)
    assert inspect.signature(run_demo).parameters["out"].default != grid_out
