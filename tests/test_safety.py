"""Loading what a stranger wrote: pickles refused before anything opens them, remote code only on request."""

import json
import pickle
import shutil
import sys

import pytest
import torch

from tunelab.data import load_task
from tunelab.errors import ModelError, TunelabError
from tunelab.methods import METHODS
from tunelab.methods.base import write_meta
from tunelab.methods.icl import ICLConfig
from tunelab.methods.io import load_adapter
from tunelab.methods.prompt_tuning import PromptTuningMethodConfig
from tunelab.models import load_model
from tunelab.safety import UnsafeFileError, adapter_path, check_adapter_dir


@pytest.fixture(autouse=True)
def one_thread():
    """Two OpenMP threads on a loaded 2-core machine run the tiny model many times slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Payload:
    """Unpickling this runs ``open(marker, "w")``: proof that code executed."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def saved_adapter(tmp_path, fresh_tiny):
    model, tok = fresh_tiny
    examples = load_task("date_format").train[:4]
    adapter = METHODS["prompt_tuning"].build(model, tok, PromptTuningMethodConfig(num_virtual_tokens=3), examples, 0)
    with torch.no_grad():
        adapter.prompt_weight.add_(1.5)  # differs from any fresh initialisation
    directory = tmp_path / "adapter"
    directory.mkdir()
    adapter.save_weights(directory)
    write_meta(directory, adapter, {"base_model": "tiny"})
    return directory, adapter.prompt_weight.detach().clone()


def test_a_saved_adapter_loads_back_through_the_safe_path(saved_adapter):
    directory, weight = saved_adapter
    model, _ = load_model("tiny")
    loaded = load_adapter(directory, model, base_model="tiny")
    assert loaded.method_name == "prompt_tuning" and loaded.config.num_virtual_tokens == 3
    assert torch.equal(loaded.adapter.prompt_weight, weight)


@pytest.mark.parametrize("layout", ["beside safetensors", "instead of safetensors", "nested .pt"])
def test_a_pickle_bearing_adapter_is_refused_before_anything_unpickles_it(saved_adapter, tmp_path, layout):
    directory, _ = saved_adapter
    marker = tmp_path / "code-ran"
    evil = {"beside safetensors": "adapter_model.bin", "instead of safetensors": "adapter_model.bin",
            "nested .pt": "extra/optimizer.pt"}[layout]
    (directory / evil).parent.mkdir(exist_ok=True)
    (directory / evil).write_bytes(pickle.dumps(Payload(marker)))
    if layout == "instead of safetensors":
        (directory / "adapter_model.safetensors").unlink()
    with pytest.raises(UnsafeFileError) as info:
        load_adapter(directory, load_model("tiny")[0])
    message = str(info.value)
    assert f"refusing to load {directory}" in message and evil in message and "arbitrary code" in message
    assert not marker.exists()
    with pytest.raises(UnsafeFileError):
        check_adapter_dir(directory)


def test_a_trained_method_without_safetensors_weights_is_refused(saved_adapter):
    directory, _ = saved_adapter
    (directory / "adapter_model.safetensors").unlink()
    with pytest.raises(UnsafeFileError, match="no \\*.safetensors weights"):
        load_adapter(directory, load_model("tiny")[0])


def test_an_icl_adapter_needs_no_weights(tmp_path, tiny):
    adapter = METHODS["icl"].build(load_model("tiny")[0], tiny[1], ICLConfig(k=2), [], 0)
    write_meta(tmp_path, adapter, {"base_model": "tiny"})
    loaded = load_adapter(tmp_path, load_model("tiny")[0])
    assert loaded.method_name == "icl" and loaded.config.k == 2


def test_adapter_meta_is_checked(saved_adapter, tmp_path):
    directory, _ = saved_adapter
    with pytest.raises(TunelabError, match="trained on 'tiny', not 'smollm2-135m'"):
        load_adapter(directory, load_model("tiny")[0], base_model="smollm2-135m")
    meta = json.loads((directory / "tunelab_adapter.json").read_text())
    (directory / "tunelab_adapter.json").write_text(json.dumps({**meta, "method": "no_such_method"}))
    with pytest.raises(TunelabError, match="unknown method 'no_such_method'"):
        load_adapter(directory, load_model("tiny")[0])
    with pytest.raises(TunelabError, match="is not a tunelab adapter"):
        load_adapter(tmp_path, load_model("tiny")[0])
    with pytest.raises(TunelabError, match="does not exist"):
        load_adapter(tmp_path / "nope", load_model("tiny")[0])


TRAINED = sorted(name for name, method in METHODS.items() if method.trains)


@pytest.mark.parametrize("name", TRAINED)
def test_every_trained_method_reloads_through_the_safe_path_and_scores_identically(name, tmp_path):
    """Guards the drift and dropped-weight reports against peft (peft #2043, #1607) for each method."""
    from tunelab.formatting import build_prompt, encode
    from tunelab.methods import method_config
    from tunelab.modeling import token_logprobs
    from tunelab.paths import atomic_directory
    from tunelab.train import collate

    model, tok = load_model("tiny")
    examples = load_task("date_format").train[:4]
    _, config = method_config({"name": name})
    adapter = METHODS[name].build(model, tok, config, examples, 0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # move every trainable tensor away from its initial value, as training would
        for param in adapter.trainable_parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    with atomic_directory(tmp_path / "adapter") as tmp:
        adapter.save_weights(tmp)
        write_meta(tmp, adapter, {"base_model": "tiny"})
    loaded = load_adapter(tmp_path / "adapter", load_model("tiny")[0], base_model="tiny").adapter

    ids, mask, labels = collate([encode(tok, build_prompt(tok, "auto", e), e.output, 64) for e in examples[:3]],
                                tok.pad_token_id)
    adapter.eval(), loaded.eval()
    with torch.no_grad():
        before, after = token_logprobs(adapter, ids, mask, labels)[0], token_logprobs(loaded, ids, mask, labels)[0]
    untrained = token_logprobs(METHODS[name].build(*load_model("tiny"), config, examples, 0).eval(), ids, mask,
                               labels)[0].detach()
    assert (before - after).abs().max().item() <= 1e-6
    assert (before - untrained).abs().max().item() > 1e-4  # the perturbation was saved, not a fresh init


@pytest.mark.parametrize("name", ["../other-run", "/etc", "a/b", ".."])
def test_adapter_names_cannot_escape_their_directory(tmp_path, name):
    with pytest.raises(TunelabError):
        adapter_path(tmp_path, name)
    assert adapter_path(tmp_path, "date_format-pt") == tmp_path.resolve() / "date_format-pt"


# --- base models from a local directory -------------------------------------------------------------------------


@pytest.fixture
def local_model(tmp_path, tiny):
    model, tok = tiny
    directory = tmp_path / "model"
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory, model


def test_a_local_model_loads_only_its_safetensors(local_model, tmp_path):
    directory, model = local_model
    marker = tmp_path / "code-ran"
    (directory / "pytorch_model.bin").write_bytes(pickle.dumps(Payload(marker)))  # ignored beside safetensors
    loaded, _ = load_model(str(directory))
    assert not marker.exists()
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values(), strict=True))


def test_a_pickle_only_model_needs_allow_pickle(local_model):
    directory, model = local_model
    torch.save(model.state_dict(), directory / "pytorch_model.bin")
    (directory / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="only pickle-format weights .*--allow-pickle"):
        load_model(str(directory))
    loaded, _ = load_model(str(directory), allow_pickle=True)  # transformers then uses torch.load(weights_only=True)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values(), strict=True))


@pytest.fixture
def remote_code_model(local_model, tmp_path, monkeypatch):
    import transformers.dynamic_module_utils as dynamic

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))  # keep ~/.cache clean
    directory, _ = local_model
    config = json.loads((directory / "config.json").read_text())
    config.update(model_type="tunelab_probe", auto_map={"AutoConfig": "configuration_probe.ProbeConfig"})
    (directory / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "code-ran"
    (directory / "configuration_probe.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import LlamaConfig\n\n\nclass ProbeConfig(LlamaConfig):\n    model_type = 'tunelab_probe'\n")
    yield directory, marker
    sys.path[:] = [p for p in sys.path if not p.startswith(str(tmp_path))]
    shutil.rmtree(tmp_path / "hf_modules", ignore_errors=True)


def test_remote_code_runs_only_with_trust_remote_code(remote_code_model, monkeypatch, capsys):
    from tunelab import cli

    directory, marker = remote_code_model
    monkeypatch.setattr(sys, "argv", ["tunelab", "run", "--model", str(directory), "--steps", "1", "-q"])
    with pytest.raises(SystemExit) as info:
        cli.main()
    output = capsys.readouterr().out.strip()
    assert info.value.code == 2 and "custom code" in output and "Traceback" not in output
    assert not marker.exists()

    monkeypatch.setattr(sys, "argv", ["tunelab", "run", "--model", str(directory), "--steps", "1", "-q",
                                      "--trust-remote-code"])
    with pytest.raises(SystemExit):  # the probe has no model class (one-line error); that it ran is the point
        cli.main()
    assert marker.exists()
