"""The live board driven through Gradio's client (the HTTP API every UI event is also served on): save,
launch and playground refuse names and paths that lead out of the runs folder (``..``, absolute paths,
symlinks) and write nothing outside it; the playground answers with LoRA and prompt-tuning adapters; a
board with a login refuses callers without it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

pytest.importorskip("gradio", reason="tunelab board needs gradio: pip install 'tunelab[board]'")
gradio_client = pytest.importorskip("gradio_client", reason="the live board tests drive it with gradio_client")

from tunelab.board import forms, playground  # noqa: E402
from tunelab.config import build_config  # noqa: E402
from tunelab.run import run  # noqa: E402

RUN = {"method": {"name": "prompt_tuning", "num_virtual_tokens": 4}, "model": {"name": "tiny"},
       "data": {"task": "date_format", "max_eval": 2}, "train": {"steps": 1, "batch_size": 2}}
FIELDS = [s.path for s in forms.form_fields() if s.path.split(".")[0] in ("model", "data", "train", "eval")]


@pytest.fixture(scope="module")
def place(tmp_path_factory):
    """tmp/runs (adapters: a LoRA and a prompt-tuning run of 2 steps), tmp/outside (a copy of the PT adapter,
    which nothing may list or run), and symlinks inside runs leading to it."""
    top = tmp_path_factory.mktemp("board-place")
    runs, outside = top / "runs", top / "outside"
    common = ["data.task=date_format", "model.name=tiny", "train.steps=2", "train.batch_size=2", "data.max_train=8",
              "data.max_eval=2"]
    for name, extra in (("lora", ["method.name=lora", "train.lr=0.05"]),
                        ("pt", ["method.name=prompt_tuning", "method.num_virtual_tokens=4"])):
        run(build_config(None, [*common, *extra, f"out={runs / 'ads' / name}"]), progress=False)
    shutil.copytree(runs / "ads" / "pt", outside / "ads" / "pt")
    (runs / "out-link").symlink_to(outside, target_is_directory=True)
    (runs / "ads" / "away").symlink_to(outside / "ads" / "pt", target_is_directory=True)
    (runs / ".board" / "configs").mkdir(parents=True)
    (outside / "secret.yaml").write_text("model: {name: secret}\n")
    (runs / ".board" / "configs" / "evil.yaml").symlink_to(outside / "secret.yaml")
    return runs, outside


def _tree(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def board(place):
    from tunelab.board.app import serve
    from tunelab.serve.local import free_port

    runs, outside = place
    before = _tree(outside)
    port = free_port()
    demo = serve(runs, port=port, block=False)
    client = gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False)
    yield client, runs, outside
    demo.close()
    assert _tree(outside) == before  # nothing the board did wrote outside the runs folder


def _send(client, folder: str, model: str, names: list[str]) -> tuple[str, list]:
    """(message, rows) of the Playground's send; an error Gradio raised before the callback ran is the message."""
    try:
        message, table = client.predict(folder, model, names, "", "2031-04-20", 4, api_name="/send")
    except Exception as exc:  # noqa: BLE001 (gradio_client raises its own AppError)
        return f"**error**: {exc}", []
    return message, table["data"]


def _form(raw: dict) -> list:
    shown = forms.shown_values(raw)
    return [shown[p] for p in FIELDS]


@pytest.mark.parametrize("name", ["../../../x", "../../../outside/x", "{outside}/x", "/tmp/tunelab-board-x",
                                  "../../out-link/x", "sub/x"])
def test_save_refuses_names_leading_out(board, name):
    client, runs, outside = board
    text = yaml.safe_dump(RUN)
    message, _ = client.predict(text, name.format(outside=outside), *_form(RUN), api_name="/save")
    assert message.startswith("**not saved**"), message
    assert not Path("/tmp/tunelab-board-x.yaml").exists() and not (runs.parent / "x.yaml").exists()
    assert not list(outside.glob("x*")) and not (runs / ".board" / "configs" / "sub").exists()


def test_save_writes_a_plain_name_under_the_runs_folder(board):
    client, runs, _ = board
    message, _ = client.predict(yaml.safe_dump(RUN), "mine", *_form(RUN), api_name="/save")
    assert "saved" in message and yaml.safe_load((runs / ".board" / "configs" / "mine.yaml").read_text())


def test_load_saved_does_not_follow_a_symlink_out(board):
    client, _, _ = board
    with pytest.raises(Exception, match="not loaded|not in the list|choices") as info:
        client.predict("evil.yaml", api_name="/load_saved")
    assert "secret" not in str(info.value)


@pytest.mark.parametrize("change", [{"out": "{outside}/run"}, {"report": {"dir": "../outside"}},
                                    {"model": {"name": "tiny", "trust_remote_code": True}},
                                    {"model": {"name": "tiny", "allow_pickle": True}},
                                    {"data": {"task": "{outside}/data.jsonl"}}, {"method": {"name": "lora",
                                                                                             "init_from": "{outside}/ads/pt"}}])
def test_start_refuses_paths_out_and_code_flags(board, change):
    client, runs, outside = board
    raw = yaml.safe_load(yaml.safe_dump({**RUN, **change}).replace("{outside}", str(outside)))
    raw = {**RUN, **raw}
    message, _ = client.predict(yaml.safe_dump(raw), "job", 1, *_form(raw), api_name="/start")
    assert message.startswith("**not started**"), message
    assert "--allow-remote-code" in message or "outside the runs folder" in message
    assert not (runs / ".board" / "jobs").exists()


@pytest.mark.parametrize("folder", ["{outside}/ads", "../outside/ads", "out-link/ads", "/tmp"])
def test_playground_refuses_folders_out_of_runs(board, folder):
    client, _, outside = board
    with pytest.raises(Exception, match="outside the runs folder"):
        client.predict(folder.format(outside=outside), api_name="/adapters")
    client.predict("ads", api_name="/adapters")  # this session's picker now offers pt
    message, rows = _send(client, folder.format(outside=outside), "tiny", ["pt"])
    assert message.startswith("**error**") and "outside the runs folder" in message and not rows


def test_playground_skips_a_symlinked_adapter_and_refuses_a_model_path_out(board):
    client, runs, outside = board
    update, model = client.predict("ads", api_name="/adapters")
    offered = [c[1] if isinstance(c, list | tuple) else c for c in update["choices"]]
    assert {"lora", "pt"} <= set(offered) and "away" not in offered and model == "tiny"
    message, rows = _send(client, "ads", "tiny", ["away"])
    assert message.startswith("**error**") and not rows
    message, rows = _send(client, "ads", str(outside), ["pt"])
    assert "outside the runs folder" in message and not rows


def test_playground_answers_with_lora_and_prompt_tuning(board):
    client, _, _ = board
    client.predict("ads", api_name="/adapters")
    message, table = _send(client, "ads", "tiny", ["lora", "pt", playground.BASE])
    assert message == "3 answers", message
    rows = {r[0]: r for r in table}
    assert rows["lora"][1] == "lora" and rows["pt"][1] == "prompt_tuning" and all(r[2] for r in rows.values())


def test_playground_function_generates_with_lora(place):
    """The playground's engine as the tab calls it: a LoRA row goes through the registry's LoRA slots
    (it raised `a LoRA row needs the registry's LoraSlots` before), and gives the offline text."""
    from tunelab.generate import GenerationConfig, generate_rows
    from tunelab.methods.io import load_adapter
    from tunelab.models import load_model
    from tunelab.serve.prompts import completion_prompt

    runs, _ = place
    engine = playground.Playground(runs)
    answers = engine.complete(runs / "ads", "tiny", ["lora", "pt"], "2031-04-20", max_tokens=6)
    assert [(a[0], a[1]) for a in answers] == [("lora", "lora"), ("pt", "prompt_tuning")]
    model, tok = load_model("tiny")
    loaded = load_adapter(runs / "ads" / "lora" / "adapter", model, tok, base_model="tiny")
    served = engine.registry(runs / "ads", "tiny").get("lora")
    ids = tok(completion_prompt(served, tok, "2031-04-20", None, raw=False), add_special_tokens=False)["input_ids"]
    offline = generate_rows([(loaded.adapter.eval(), ids)], tok, GenerationConfig(max_new_tokens=6), batch_size=1)
    assert answers[0][2] == offline[0]


def test_a_board_with_a_login_refuses_callers_without_it(place):
    import httpx

    from tunelab.board.app import serve
    from tunelab.serve.local import free_port

    runs, _ = place
    port = free_port()
    demo = serve(runs, port=port, block=False, auth=[("ann", "s3:cret")])
    url = f"http://127.0.0.1:{port}/"
    try:
        assert httpx.get(url + "config").status_code == 401
        assert httpx.post(url + "login", data={"username": "ann", "password": "wrong"}).status_code >= 400
        with pytest.raises(Exception):  # noqa: B017 (the client raises its own error types)
            gradio_client.Client(url, verbose=False)
        client = gradio_client.Client(url, auth=("ann", "s3:cret"), verbose=False)
        update, model = client.predict("ads", api_name="/adapters")
        assert model == "tiny"
    finally:
        demo.close()
