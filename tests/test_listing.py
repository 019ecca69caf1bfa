"""`tunelab ls methods --model M`: every registered method with its exact trainable-parameter count."""

from rich.console import Console

from tunelab.listing import list_things
from tunelab.methods import METHODS


def test_ls_methods_counts_each_method_on_a_fresh_model():
    console = Console(record=True, width=200)
    list_things(console, "methods", model="tiny")
    lines = {line.split("│")[1].strip(): line for line in console.export_text().splitlines() if line.count("│") > 3}
    assert set(METHODS) <= set(lines)
    count = {name: int(lines[name].split("│")[5].strip().replace(",", "")) for name in METHODS}
    assert lines["ipt"].split("│")[4].strip() == METHODS["ipt"].capabilities.describe()
    assert count["icl"] == count["discrete_prompt"] == 0
    assert count["prompt_tuning"] == 20 * 16  # default 20 virtual tokens x hidden 16
    # r=8 on q (16->16) and v (16->8) in 2 layers; a fresh model per method, so nothing leaks between rows
    assert count["lora"] == 2 * 8 * ((16 + 16) + (16 + 8))
    assert count["full_finetune"] > count["lora"] > 0
