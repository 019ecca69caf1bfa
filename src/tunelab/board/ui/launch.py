"""Launch tab: a run or grid from a form generated from the typed configs; start, stop, watch, reattach."""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import pandas as pd
import yaml

from tunelab.board import confine, forms, jobs
from tunelab.board.stores import BOARD_DIR
from tunelab.errors import TunelabError
from tunelab.paths import atomic_write_text

POLL_SECONDS = 2.0
NAME = "(name)"  # key of the default output name in the form's baseline state
EMPTY_CELLS = pd.DataFrame(columns=["method", "task", "seed", "status", "step", "loss", "quality", "key"])
EMPTY_LOSS = pd.DataFrame(columns=["cell", "step", "loss"])


def _saved_dir(runs: Path) -> Path:
    return runs / BOARD_DIR / "configs"


def _saved_path(runs: Path, name: str) -> Path:
    """``RUNS/.board/configs/NAME`` for a plain name; refused when it would lead out of the runs folder."""
    folder = confine.inside(runs, _saved_dir(runs), "saved configs folder")
    return confine.child(folder, name, "name")


def _saved(runs: Path) -> list[str]:
    folder = _saved_dir(runs)
    names = sorted(p.name for p in folder.glob("*.yaml")) if folder.is_dir() else []
    return [n for n in names if _loadable(runs, n)]


def _loadable(runs: Path, name: str) -> bool:
    try:
        return _saved_path(runs, name).is_file()
    except TunelabError:  # a symlink leading out of the runs folder: not offered
        return False


def _job_choices(runs: Path) -> list[tuple[str, str]]:
    return [(f"{j.id} · {jobs.status(j)}", j.id) for j in jobs.list_jobs(runs)]


def build(runs: Path, allow_remote_code: bool = False) -> dict:
    """Build the tab; launches that set a code flag (``confine.CODE_FLAGS``) need ``allow_remote_code``."""
    specs = forms.form_fields()
    choices = forms.templates()
    first = next(iter(choices))
    with gr.Row():
        template = gr.Dropdown(list(choices), value=first, label="start from", elem_id="launch-template", scale=2)
        saved = gr.Dropdown(_saved(runs), label=f"saved configs ({BOARD_DIR}/configs)", elem_id="launch-saved",
                            scale=2)
        load_saved = gr.Button("load saved", scale=1)
    with gr.Row():
        with gr.Column(scale=3):
            editor = gr.Code(choices[first], language="yaml", label="YAML (a run: `method`; a grid: `methods`, "
                             "`tasks`, `seeds`, ...)", elem_id="launch-yaml", lines=18)
        with gr.Column(scale=2):
            fields: dict[str, gr.components.Component] = {}
            for section in ("model", "data", "train", "eval"):
                with gr.Accordion(f"{section} (overrides the YAML)", open=section == "train"):
                    for spec in (s for s in specs if s.path.startswith(section + ".")):
                        label = f"{spec.path}  ({spec.type_name})"
                        elem = "launch-field-" + spec.path.replace(".", "-")
                        locked = spec.path in confine.CODE_FLAGS and not allow_remote_code
                        if locked:
                            label += f"  (off: the board was started without {confine.REMOTE_CODE_FLAG})"
                        fields[spec.path] = (gr.Checkbox(label=label, elem_id=elem, interactive=not locked)
                                             if spec.kind == "bool" else gr.Textbox(label=label, elem_id=elem,
                                                                                    max_lines=1))
    with gr.Row():
        name = gr.Textbox(label="name (output folder under the runs folder)", elem_id="launch-name", scale=2)
        workers = gr.Number(1, label="workers (grid cells at once)", precision=0, minimum=1, scale=1)
    preview = gr.Textbox(label="command preview (what the board runs, as you would type it)",
                         elem_id="launch-preview", interactive=False, lines=2)
    with gr.Row():
        save = gr.Button("save YAML", elem_id="launch-save")
        start = gr.Button("start", variant="primary", elem_id="launch-start")
        stop = gr.Button("stop", variant="stop", elem_id="launch-stop")
    message = gr.Markdown(elem_id="launch-message")
    with gr.Row():
        job = gr.Dropdown(_job_choices(runs), label="job (state kept on disk: reattaches after a reload)",
                          elem_id="launch-job", scale=4)
        refresh = gr.Button("refresh", scale=1)
    state = gr.Markdown(elem_id="launch-status")
    cells = gr.Dataframe(label="cells", elem_id="launch-cells", wrap=True)
    loss = gr.LinePlot(x="step", y="loss", color="cell", title="training loss per cell (train_log.jsonl)",
                       elem_id="launch-loss")
    tail = gr.Textbox(label="log tail", lines=12, max_lines=12, elem_id="launch-log", autoscroll=True)
    timer = gr.Timer(POLL_SECONDS)
    field_list = list(fields.values())
    paths = list(fields)
    baseline = gr.State({})  # the fields as last filled from the YAML: a field differing from it is an override

    def reset(text: str):
        """Template or saved config loaded: every field from the YAML, and a default name."""
        try:
            raw = forms.parse_yaml(text)
        except TunelabError:
            return [gr.update() for _ in field_list] + [gr.update(), gr.update()]
        shown = forms.shown_values(raw)
        return [*(shown[p] for p in paths), forms.default_name(raw), {**shown, NAME: forms.default_name(raw)}]

    def follow(text: str, base: dict, name_value: str, *values):
        """The YAML was edited: untouched fields follow it, edited ones stay (they are the overrides)."""
        try:
            raw = forms.parse_yaml(text)
        except TunelabError:
            return [gr.update() for _ in field_list] + [gr.update(), gr.update()]
        current = dict(zip(paths, values, strict=True))
        kept = forms.refill(raw, base, current)
        name_value = forms.default_name(raw) if name_value in ("", base.get(NAME)) else name_value  # unless typed
        return [*(kept[p] for p in paths), name_value, {**forms.shown_values(raw), NAME: forms.default_name(raw)}]

    def resolve(text: str, base: dict, values: list):
        raw = forms.parse_yaml(text)
        extra = forms.overrides(base, dict(zip(paths, values, strict=True)))
        return forms.resolved(raw, extra), extra

    def show_preview(text: str, base: dict, name_value: str, workers_value, *values):
        try:
            data, extra = resolve(text, base, list(values))
        except TunelabError as exc:
            return f"# not valid yet: {exc}"
        try:
            confine.check_launch(runs, data, allow_remote_code)
        except TunelabError as exc:
            return f"# refused: {exc}"
        config = _saved_dir(runs) / f"{name_value or forms.default_name(data)}.yaml"
        out = runs / (name_value or forms.default_name(data))
        lines = [forms.preview(forms.kind_of(data), config, out, int(workers_value or 1))]
        if extra:
            lines.append("# the saved YAML has the form's overrides applied: " + " ".join(extra))
        return "\n".join(lines)

    def do_save(text: str, base: dict, name_value: str, *values):
        try:
            data, _ = resolve(text, base, list(values))
            path = _saved_path(runs, f"{name_value or forms.default_name(data)}.yaml")
            atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))
        except TunelabError as exc:
            return f"**not saved**: {exc}", gr.update()
        return f"saved `{path}`", gr.update(choices=_saved(runs), value=path.name)

    def do_load_saved(file: str | None):
        if not file:
            return gr.update()
        try:
            return _saved_path(runs, file).read_text()
        except (TunelabError, OSError) as exc:
            raise gr.Error(f"not loaded: {exc}") from None

    def do_start(text: str, base: dict, name_value: str, workers_value, *values):
        try:
            data, _ = resolve(text, base, list(values))
            started = jobs.start_job(runs, data, name_value or forms.default_name(data), int(workers_value or 1),
                                     allow_remote_code=allow_remote_code)
        except TunelabError as exc:
            return f"**not started**: {exc}", gr.update()
        return (f"started `{started.id}` (pid {started.pid}) writing `{started.out}`",
                gr.update(choices=_job_choices(runs), value=started.id))

    def do_stop(job_id: str | None):
        if not job_id:
            return "no job selected"
        stopped = jobs.stop_job(runs, jobs.get_job(runs, job_id))
        return f"stopped `{stopped.id}`"

    def watch(job_id: str | None):
        if not job_id:
            return "no job yet: start one above", EMPTY_CELLS, EMPTY_LOSS, ""
        try:
            current = jobs.get_job(runs, job_id)
        except TunelabError as exc:
            return str(exc), EMPTY_CELLS, EMPTY_LOSS, ""
        table = jobs.progress(current)
        counts = table["status"].value_counts().to_dict() if len(table) else {}
        summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        where = f" · store `{current.store}`" if current.store else ""
        text = (f"**{jobs.status(current)}** · {current.kind} `{current.name}` · {summary} · out `{current.out}`"
                f"{where}")
        return text, table, jobs.loss_curves(current), jobs.log_tail(current)

    def latest():
        """On page load: reattach to the newest running job, else the newest job."""
        found = jobs.list_jobs(runs)
        running = [j for j in found if jobs.is_running(j)]
        chosen = (running or found or [None])[0]
        return gr.update(choices=_job_choices(runs), value=chosen.id if chosen else None)

    form_inputs = [editor, baseline, name, workers, *field_list]
    filled = [*field_list, name, baseline]
    template.input(lambda key: choices[key], [template], [editor]).then(  # type: ignore[attr-defined]
        reset, [editor], filled).then(show_preview, form_inputs, [preview])
    load_saved.click(do_load_saved, [saved], [editor], api_name="load_saved").then(reset, [editor], filled).then(
        show_preview, form_inputs, [preview])
    editor.input(follow, [editor, baseline, name, *field_list], filled).then(show_preview, form_inputs, [preview])
    for control in (name, workers, *field_list):
        control.input(show_preview, form_inputs, [preview])  # type: ignore[attr-defined]
    save.click(do_save, [editor, baseline, name, *field_list], [message, saved], api_name="save")
    start.click(do_start, form_inputs, [message, job], api_name="start").then(watch, [job], [state, cells, loss, tail])
    stop.click(do_stop, [job], [message]).then(watch, [job], [state, cells, loss, tail])
    refresh.click(lambda current: gr.update(choices=_job_choices(runs), value=current), [job], [job])
    job.input(watch, [job], [state, cells, loss, tail])
    timer.tick(watch, [job], [state, cells, loss, tail])

    def on_load(demo: gr.Blocks) -> None:
        demo.load(reset, [editor], filled).then(show_preview, form_inputs, [preview])
        demo.load(latest, None, [job]).then(watch, [job], [state, cells, loss, tail])

    return {"on_load": on_load}
