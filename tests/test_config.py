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
    with pytest.raises(ConfigError, match="^method.name: unknown method 'promt_tuning'; choose one of icl, "):
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
