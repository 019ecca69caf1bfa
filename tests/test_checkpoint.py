"""Checkpoints: what they hold, that resuming from one is exact, and that mismatched runs are refused."""

import json
import random

import numpy as np
import pytest
import torch

import tunelab.modeling
import tunelab.train
from tunelab.checkpoint import (
    CheckpointMismatch,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    training_identity,
)
from tunelab.config import TrainConfig, build_config
from tunelab.data import load_task
from tunelab.formatting import build_prompt, encode
from tunelab.methods import METHODS, method_config
from tunelab.methods.prompt_tuning import PromptTuningMethodConfig
from tunelab.models import load_model
from tunelab.run import run
from tunelab.train import TrainingDiverged, train


@pytest.fixture(autouse=True)
def one_thread():
    """Two OpenMP threads on a loaded 2-core machine run these tiny steps ~30x slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _params_and_optimizer():
    torch.manual_seed(0)
    # a (1,)-shaped parameter: its AdamW moments have one element and must keep their shape
    params = {"w": torch.nn.Parameter(torch.randn(3, 2)), "b": torch.nn.Parameter(torch.randn(1))}
    opt = torch.optim.AdamW(params.values(), lr=0.1, betas=(0.8, 0.95), weight_decay=0.01)
    for _ in range(3):
        opt.zero_grad()
        (params["w"].sum() ** 2 + params["b"].sum() ** 2).backward()
        opt.step()
    return params, opt


def test_checkpoint_round_trips_params_optimizer_and_every_rng(tmp_path):
    params, opt = _params_and_optimizer()
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    path = save_checkpoint(tmp_path, 3, params, opt, {"losses": [1.0, 0.5, 0.25]})
    expected = (random.random(), np.random.rand(), torch.rand(1))
    assert path.name == "step-00000003" and sorted(p.name for p in path.iterdir()) == ["state.json",
                                                                                       "state.safetensors"]

    fresh = {k: torch.nn.Parameter(torch.zeros_like(v)) for k, v in params.items()}
    opt2 = torch.optim.AdamW(fresh.values(), lr=1.0)
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    meta = load_checkpoint(tmp_path, fresh, opt2)

    assert meta["step"] == 3 and meta["losses"] == [1.0, 0.5, 0.25]
    assert all(torch.equal(fresh[k], params[k]) for k in params)
    saved, loaded = opt.state_dict(), opt2.state_dict()
    for idx, state in saved["state"].items():
        for key, value in state.items():
            assert loaded["state"][idx][key].dtype == value.dtype and torch.equal(loaded["state"][idx][key], value)
    assert loaded["param_groups"][0]["lr"] == 0.1 and tuple(loaded["param_groups"][0]["betas"]) == (0.8, 0.95)
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


def test_only_the_newest_complete_checkpoint_is_kept(tmp_path):
    params, opt = _params_and_optimizer()
    (tmp_path / ".step-00000009.abc.tmp").mkdir()  # left by a writer killed mid-checkpoint
    save_checkpoint(tmp_path, 1, params, opt)
    save_checkpoint(tmp_path, 2, params, opt)
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000002"]
    (tmp_path / "step-00000005").mkdir()  # a directory without state.json is not a checkpoint
    assert latest_checkpoint(tmp_path).name == "step-00000002"
    assert latest_checkpoint(tmp_path / "missing") is None and latest_checkpoint(None) is None


def _setup(n=8, dropout=0.0):
    model, tok = load_model("tiny")
    for module in model.modules():  # dropout makes training consume the torch RNG, so resume must restore it
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = dropout
    examples = load_task("date_format").train[:n]
    data = [encode(tok, build_prompt(tok, "auto", e), e.output, 128) for e in examples]
    adapter = METHODS["prompt_tuning"].build(model, tok, PromptTuningMethodConfig(num_virtual_tokens=4), examples, 0)
    return adapter, data, tok


class Killed(Exception):
    pass


def _kill_at(step_to_kill):
    def on_step(step, _loss):
        if step == step_to_kill:
            raise Killed

    return on_step


def test_resume_is_exact_with_warmup_accumulation_decay_and_dropout(tmp_path):
    cfg = TrainConfig(steps=7, batch_size=2, grad_accum=2, warmup_steps=3, weight_decay=0.1, checkpoint_every=2)
    full, data, tok = _setup(dropout=0.3)
    torch.manual_seed(5)
    reference = train(full, data, cfg, lr=0.1, pad_id=tok.pad_token_id, checkpoint_dir=tmp_path / "a")

    part, _, _ = _setup(dropout=0.3)
    torch.manual_seed(5)
    with pytest.raises(Killed):
        train(part, data, cfg, lr=0.1, pad_id=tok.pad_token_id, checkpoint_dir=tmp_path / "b", on_step=_kill_at(5))
    resumed, _, _ = _setup(dropout=0.3)
    torch.manual_seed(123)  # a different process state; the checkpoint's RNG must win
    stats = train(resumed, data, cfg, lr=0.1, pad_id=tok.pad_token_id, checkpoint_dir=tmp_path / "b", resume=True)

    assert stats.resumed_from == 4 and len(stats.losses) == 7
    assert stats.losses == pytest.approx(reference.losses, abs=1e-6) and stats.tokens == reference.tokens
    assert (resumed.prompt_weight - full.prompt_weight).abs().max().item() <= 1e-6
    assert latest_checkpoint(tmp_path / "b").name == "step-00000007"  # the final state is saved too


def test_lr_schedule_is_a_pure_function_of_the_step():
    a, b = tunelab.train.lr_lambda(3, 10), tunelab.train.lr_lambda(3, 10)
    assert [a(s) for s in range(10)] == [b(s) for s in reversed(range(10))][::-1]
    assert a(0) == pytest.approx(1 / 3) and a(3) == 1.0 and a(9) == pytest.approx(1 - 0.9 * 6 / 7)


def _identity(**overrides):
    cfg = build_config(None, ["model.name=tiny", "method.name=prompt_tuning"] + [f"{k}={v}" for k, v in overrides.items()])
    _, method_cfg = method_config(cfg.method)
    return training_identity(cfg, method_cfg, cfg.train.lr or method_cfg.lr, [])


def test_resume_with_other_settings_is_refused_naming_them(tmp_path):
    cfg = TrainConfig(steps=4, batch_size=4, checkpoint_every=1)
    adapter, data, tok = _setup()
    with pytest.raises(Killed):
        train(adapter, data, cfg, lr=0.1, pad_id=tok.pad_token_id, checkpoint_dir=tmp_path, on_step=_kill_at(2),
              identity=_identity(**{"train.lr": 0.1}))
    meta = json.loads((latest_checkpoint(tmp_path) / "state.json").read_text())
    assert len(meta["fingerprint"]) == 64 and meta["identity"]["train.lr"] == 0.1

    for changed, key in [({"train.lr": 0.2}, "train.lr: checkpoint 0.1, now 0.2"),
                         ({"train.lr": 0.1, "train.seed": 1}, "train.seed"),
                         ({"train.lr": 0.1, "train.steps": 50}, "train.steps"),
                         ({"train.lr": 0.1, "method.num_virtual_tokens": 7}, "method.num_virtual_tokens")]:
        fresh, _, _ = _setup()
        with pytest.raises(CheckpointMismatch, match="cannot resume") as info:
            train(fresh, data, cfg, lr=0.1, pad_id=tok.pad_token_id, checkpoint_dir=tmp_path, resume=True,
                  identity=_identity(**changed))
        assert key in str(info.value) and "--restart" in str(info.value)
    fresh, _, _ = _setup()
    stats = train(fresh, data, cfg, lr=0.1, pad_id=tok.pad_token_id, checkpoint_dir=tmp_path, resume=True,
                  identity=_identity(**{"train.lr": 0.1}))
    assert stats.resumed_from == 1  # on_step runs before that step's checkpoint


def test_training_identity_hashes_the_tokenized_data():
    adapter, data, tok = _setup()
    cfg = build_config(None, ["model.name=tiny"])
    _, method_cfg = method_config(cfg.method)
    a = training_identity(cfg, method_cfg, 0.1, data)
    b = training_identity(cfg, method_cfg, 0.1, data[:-1])
    assert a != b and {k for k in a if a[k] != b[k]} == {"training data (sha256 of tokenized examples)"}


# --- the same through `tunelab.run`: NaN, crash during evaluation, refusal --------------------------------------


def _cfg(out, *extra):
    return build_config(None, ["model.name=tiny", "method.name=prompt_tuning", "method.num_virtual_tokens=4",
                               "data.task=date_format", "data.max_train=16", "data.max_eval=2", "train.steps=6",
                               "train.batch_size=4", "train.checkpoint_every=2", f"out={out}", *extra])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_loss_stops_the_run_keeps_the_last_good_checkpoint_and_writes_no_result(tmp_path, monkeypatch, bad):
    real_loss, calls = tunelab.modeling.causal_lm_loss, []

    def poisoned(*args, **kwargs):
        loss, logits = real_loss(*args, **kwargs)
        calls.append(1)
        return (loss * bad if len(calls) == 5 else loss), logits  # the 5th optimizer step (batch = 1 micro-batch)

    monkeypatch.setattr(tunelab.modeling, "causal_lm_loss", poisoned)  # what Adapter.forward calls
    with pytest.raises(TrainingDiverged) as info:
        run(_cfg(tmp_path / "out"), progress=False)
    message = str(info.value)
    assert f"loss became {bad}" in message and "at step 5" in message and "train.lr" in message
    assert "step-00000004" in message
    # no result, adapter, predictions; the step log keeps the steps before the divergence
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["checkpoint", "train_log.jsonl"]
    kept = latest_checkpoint(tmp_path / "out" / "checkpoint")
    meta = json.loads((kept / "state.json").read_text())
    assert meta["step"] == 4 and all(np.isfinite(meta["losses"])) and len(meta["losses"]) == 4


def test_non_finite_weights_are_never_checkpointed(tmp_path, monkeypatch):
    real_step = torch.optim.AdamW.step

    def poisoning_step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        if self.state[self.param_groups[0]["params"][0]]["step"] == 3:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("inf"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoning_step)
    adapter, data, tok = _setup()
    with pytest.raises(TrainingDiverged, match="parameters became NaN/inf at step 3"):
        train(adapter, data, TrainConfig(steps=6, batch_size=4, checkpoint_every=1), lr=0.1,
              pad_id=tok.pad_token_id, checkpoint_dir=tmp_path)
    assert latest_checkpoint(tmp_path).name == "step-00000002"


def test_crash_during_evaluation_resumes_without_retraining(tmp_path, monkeypatch):
    import tunelab.run as run_module

    reference = run(_cfg(tmp_path / "ref"), progress=False)
    assert not (tmp_path / "ref" / "checkpoint").exists()  # a finished run keeps no checkpoint

    real_evaluate = run_module.evaluate
    monkeypatch.setattr(run_module, "evaluate", lambda *a, **k: (_ for _ in ()).throw(Killed()))
    with pytest.raises(Killed):
        run(_cfg(tmp_path / "out"), progress=False)
    assert latest_checkpoint(tmp_path / "out" / "checkpoint").name == "step-00000006"
    assert not (tmp_path / "out" / "result.json").exists()

    with pytest.raises(CheckpointMismatch, match="train.lr"):
        run(_cfg(tmp_path / "out", "train.lr=0.5", "train.resume=true"), progress=False)

    monkeypatch.setattr(run_module, "evaluate", real_evaluate)
    monkeypatch.setattr(tunelab.modeling, "causal_lm_loss", lambda *a, **k: pytest.fail("resume retrained"))
    result = run(_cfg(tmp_path / "out", "train.resume=true"), progress=False)
    assert result["train"]["resumed_from"] == 6 and result["train"]["losses"] == reference["train"]["losses"]
    assert result["metrics"] == reference["metrics"]
    assert json.loads((tmp_path / "out" / "result.json").read_text())["train"]["resumed_from"] == 6
    assert not (tmp_path / "out" / "checkpoint").exists()


@pytest.mark.parametrize("name", sorted(n for n, m in METHODS.items() if m.trains))
def test_resume_is_exact_for_every_trained_method(name, tmp_path):
    examples = load_task("date_format").train[:8]
    cfg = TrainConfig(steps=4, batch_size=4, checkpoint_every=1)

    def fresh():
        model, tok = load_model("tiny")
        _, method_cfg = method_config({"name": name})
        adapter = METHODS[name].build(model, tok, method_cfg, examples, 0)
        data = [encode(tok, build_prompt(tok, "auto", e), e.output, 64) for e in examples]
        return adapter, data, tok, method_cfg.lr

    def trained(adapter):
        return {n: p.detach().clone() for n, p in adapter.named_parameters() if p.requires_grad}

    full, data, tok, lr = fresh()
    train(full, data, cfg, lr=lr, pad_id=tok.pad_token_id, checkpoint_dir=tmp_path / "a")
    part, _, _, _ = fresh()
    with pytest.raises(Killed):
        train(part, data, cfg, lr=lr, pad_id=tok.pad_token_id, checkpoint_dir=tmp_path / "b", on_step=_kill_at(3))
    resumed, _, _, _ = fresh()
    stats = train(resumed, data, cfg, lr=lr, pad_id=tok.pad_token_id, checkpoint_dir=tmp_path / "b", resume=True)
    expected, got = trained(full), trained(resumed)
    assert stats.resumed_from == 2 and expected.keys() == got.keys()
    assert max((expected[k] - got[k]).abs().max().item() for k in expected) <= 1e-6


# ---------------------------------------------------------------- rerunning into the same --out (#29)

class _Crash:
    """A dev-loss monitor that kills the run at step 3, after the checkpoints of steps 1 and 2."""

    every = 3

    def __call__(self, step: int, dev_loss: float) -> bool:
        raise RuntimeError("killed")


def _rerun_cfg(out, *extra: str):
    from tunelab.config import build_config

    return build_config(None, ["method.name=prompt_tuning", "method.num_virtual_tokens=4", "model.name=tiny",
                               "data.task=date_format", "data.max_train=8", "data.max_eval=2", "train.steps=4",
                               "train.batch_size=2", "train.checkpoint_every=1", "eval.loss=false",
                               f"out={out}", *extra])


def _killed_run(out) -> None:
    from tunelab.checkpoint import latest_checkpoint
    from tunelab.run import run

    with pytest.raises(RuntimeError, match="killed"):
        run(_rerun_cfg(out), progress=False, monitor=_Crash())
    assert latest_checkpoint(out / "checkpoint").name == "step-00000002"


def test_rerun_without_resume_continues_from_a_matching_checkpoint(tmp_path):
    """It used to start again from step 1 and delete the checkpoint at its first save."""
    from tunelab.run import run

    _killed_run(tmp_path)
    result = run(_rerun_cfg(tmp_path), progress=False)
    assert result["train"]["resumed_from"] == 2 and result["train"]["steps"] == 4


def test_rerun_with_other_settings_refuses_naming_them_and_keeps_the_checkpoint(tmp_path):
    from tunelab.checkpoint import CheckpointMismatch, latest_checkpoint
    from tunelab.run import run

    _killed_run(tmp_path)
    with pytest.raises(CheckpointMismatch, match=r"train\.lr.*--restart") as info:
        run(_rerun_cfg(tmp_path, "train.lr=0.5"), progress=False)
    assert "\n" not in str(info.value)
    assert latest_checkpoint(tmp_path / "checkpoint").name == "step-00000002"


def test_restart_throws_the_checkpoint_away(tmp_path):
    from tunelab.run import run

    _killed_run(tmp_path)
    result = run(_rerun_cfg(tmp_path, "train.lr=0.5", "train.restart=true"), progress=False)
    assert result["train"]["resumed_from"] is None and len(result["train"]["losses"]) == 4
