import torch
from peft import PeftModel

from tunelab.data import load_task
from tunelab.generate import GenerationConfig, generate
from tunelab.methods import METHODS
from tunelab.methods.prompt_tuning import PromptTuningMethodConfig, initial_prompt
from tunelab.models import load_model


def test_text_init_tiles_instruction_embeddings(tiny):
    model, tok = tiny
    cfg = PromptTuningMethodConfig(num_virtual_tokens=7, init="text", init_text="Rewrite the date")
    ids = tok("Rewrite the date", add_special_tokens=False)["input_ids"]
    prompt = initial_prompt(model, tok, cfg, [], 0)
    table = model.get_input_embeddings().weight
    assert torch.equal(prompt[0], table[ids[0]]) and torch.equal(prompt[len(ids)], table[ids[0]])


def test_saved_adapter_is_peft_format_and_reloads_identically(tmp_path):
    model, tok = load_model("tiny")
    train = load_task("date_format").train[:4]
    method = METHODS["prompt_tuning"]
    adapter = method.build(model, tok, PromptTuningMethodConfig(num_virtual_tokens=5, init="random"), train, 0)
    with torch.no_grad():
        adapter.prompt_weight.add_(0.5)
    adapter.save_weights(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file()

    prompts = [tok(t)["input_ids"] for t in ["one", "two three four"]]
    cfg = GenerationConfig(max_new_tokens=8)
    before = generate(adapter, tok, prompts, cfg)

    reloaded = method.load(tmp_path, load_model("tiny")[0], adapter.config)
    assert torch.equal(reloaded.prompt_weight, adapter.prompt_weight)
    assert generate(reloaded, tok, prompts, cfg) == before

    # plain peft loads it too, and every token we chose greedily is peft's argmax at that step, up to float
    # rounding (a random 16-dim model has near-ties that rounding alone flips, so token equality is too strict)
    peft_model = PeftModel.from_pretrained(load_model("tiny")[0], str(tmp_path))
    ours = tok(before[1], add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompts[1] + ours])
    with torch.no_grad():
        logits = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -len(ours) - 1: -1]
    chosen = logits.gather(-1, torch.tensor(ours).unsqueeze(-1)).squeeze(-1)
    assert len(ours) > 0 and torch.all(chosen >= logits.max(-1).values - 1e-4), (chosen, logits.max(-1).values)
