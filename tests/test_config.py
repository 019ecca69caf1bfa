import json

import pytest

from tunelab.config import RunConfig, build_config, to_dict
from tunelab.errors import ConfigError


def test_defaults_yaml_and_overrides_layer(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method: {name: icl, k: 2}\ntrain: {steps: 7, lr: 0.5}\n")
    cfg = build_config(path, ["train.lr=1e-3", "data.task=arithmetic"])
    assert isinstance(cfg, RunConfig)
    assert type(cfg.method).__name__ == "ICLConfig" and cfg.method.k == 2 and cfg.method_name == "icl"
    assert to_dict(cfg)["method"] == {"name": "icl", "k": 2}  # written as given (result.json, cell keys)
    assert cfg.train.steps == 7 and cfg.train.lr == pytest.approx(1e-3)
    assert cfg.data.task == "arithmetic" and cfg.train.batch_size == 8


def test_method_given_as_string():
    cfg = build_config(None, ["method=icl"])
    assert cfg.method_name == "icl" and to_dict(cfg)["method"] == {"name": "icl"}
    assert build_config(None, ["method=ipt", "method.k=2"]).method.k == 2
    assert build_config(None, ["method.k=3", "method.name=icl"]).method.k == 3
    assert build_config(None, []).method_name == "prompt_tuning"


@pytest.mark.parametrize("override, message", [
    (["train.lrr=1"], "train.lrr"),
    (["train.steps=abc"], "train.steps"),
    (["data.max_eval=1.5"], "data.max_eval"),
    (["nosuch=1"], "nosuch"),
    (["train.steps"], "section.key=value"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        build_config(None, override)


def test_bad_yaml_names_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        build_config(path)


def test_method_options_validated_against_method_dataclass():
    from tunelab.methods import method_config

    method, cfg = method_config({"name": "prompt_tuning", "num_virtual_tokens": "8"})
    assert method.name == "prompt_tuning" and cfg.num_virtual_tokens == 8
    with pytest.raises(ConfigError, match="method.num_virtual_tokenz"):
        method_config({"name": "prompt_tuning", "num_virtual_tokenz": 8})
    with pytest.raises(ConfigError, match="^method.name: unknown method 'promt_tuning' \\(did you mean 'prompt_tuning'\\?\\); choose one of icl, "):
        method_config({"name": "promt_tuning"})
    with pytest.raises(ConfigError, match="^method.num_virtual_tokens: got 0, expected an integer >= 1$"):
        method_config({"name": "prompt_tuning", "num_virtual_tokens": 0})


def test_a_dotted_override_can_index_a_list_and_leaves_the_input_alone():
    from tunelab.config import apply_overrides

    data = {"tasks": [{"task": "a", "eval_per_task": 25}, {"task": "b"}], "train": {"steps": 5}}
    out = apply_overrides(data, ["tasks.0.eval_per_task=100", "tasks.1.max_eval=20", "train.steps=7"])
    assert out["tasks"] == [{"task": "a", "eval_per_task": 100}, {"task": "b", "max_eval": 20}]
    assert data["tasks"][0]["eval_per_task"] == 25 and "max_eval" not in data["tasks"][1]  # a copy was changed
    with pytest.raises(ConfigError, match=r"'2' is not an index of that list \(0 to 1\)"):
        apply_overrides(data, ["tasks.2.max_eval=5"])
    with pytest.raises(ConfigError, match="'steps' is not a section"):
        apply_overrides(data, ["train.steps.x=1"])


# ---------------------------------------------------------------- every dotted key is used or refused (#29)

def _rows(path, n: int, bad_line: bool = False):
    lines = [json.dumps({"instruction": "Echo.", "input": str(i), "output": str(i)}) for i in range(n)]
    if bad_line:
        lines.insert(3, json.dumps({"input": "no instruction, no output"}))
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_eval_honours_run_spelling_of_its_keys(tmp_path):
    """`tunelab eval --data F data.max_eval=10` scored all 100 rows: the --data flag replaced the `data` section."""
    from tunelab.config import EvalCommandConfig, build
    from tunelab.protocols import select_examples

    data = _rows(tmp_path / "d.jsonl", 100)
    req = build(EvalCommandConfig, None, ["data.max_eval=10", "model.name=tiny", "eval.metrics=exact_match"],
                {"data": data})
    assert (req.max_eval, req.model, req.metrics) == (10, "tiny", ["exact_match"])
    assert len(select_examples(req)[0]) == 10


def test_eval_skip_bad_is_honoured(tmp_path):
    from tunelab.config import EvalCommandConfig, build
    from tunelab.errors import DataError
    from tunelab.protocols import select_examples

    data = _rows(tmp_path / "d.jsonl", 8, bad_line=True)
    with pytest.raises(DataError):
        select_examples(build(EvalCommandConfig, None, [], {"data": data}))
    examples, info = select_examples(build(EvalCommandConfig, None, ["data.skip_bad=true"], {"data": data}))
    assert len(examples) == 8 and info["skipped_bad_records"] == 1


@pytest.mark.parametrize("cls_name, overrides, flags, needle", [
    ("EvalCommandConfig", ["data.max_evl=3"], {"data": "x.jsonl"}, "did you mean 'data.max_eval'?"),
    ("EvalCommandConfig", ["eval.loss=false"], {"data": "x.jsonl"}, "eval.loss: not used here"),
    ("ServeConfig", ["model.name=x"], {"adapters": "a", "model": "tiny"}, "model: a value, not a section"),
    ("ServeConfig", ["model.name=x"], {"adapters": "a"}, "model: a value, not a section"),
    ("RunConfig", ["out.dir=x"], {"out": "runs/x"}, "valid keys: data, eval, method, model, out, report, train"),
])
def test_keys_a_command_does_not_use_are_errors(cls_name, overrides, flags, needle):
    """A flag used to overwrite a section the overrides had made (dropping its keys in silence)."""
    import tunelab.config as config

    with pytest.raises(ConfigError) as info:
        config.build(getattr(config, cls_name), None, overrides, flags)
    assert needle in str(info.value)


def test_typo_in_a_key_suggests_the_key():
    with pytest.raises(ConfigError, match="did you mean 'max_eval'"):
        build_config(None, ["data.max_evl=3"])
    with pytest.raises(ConfigError, match="did you mean 'prompt_tuning'"):
        build_config(None, ["method=prompt_tunning"])


def test_resume_and_restart_conflict():
    with pytest.raises(ConfigError, match="choose one"):
        build_config(None, ["train.resume=true", "train.restart=true"])
