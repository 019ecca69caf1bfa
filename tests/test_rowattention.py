"""Per-row prefill attention (tunelab.rowattention): a left-padded batch prefills each row to the bits of the
row alone, close to SDPA; outside ``exact_rows`` (training, scoring) it is SDPA itself."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import base_and_soft_prompt

from tunelab import precision, rowattention
from tunelab.inference import engine

TEXTS = ["x", "Translate to French: good morning", "A longer prompt with several more words in it, about the sea.",
         "Two words"]


def _rows(model_tok):
    model, tok, (base, soft) = base_and_soft_prompt(model_tok)
    return model, [(base if i % 2 else soft, tok(t)["input_ids"]) for i, t in enumerate(TEXTS)]


def test_load_model_installs_it_on_llama(fresh_tiny):
    model, _ = fresh_tiny
    assert model.config._attn_implementation == rowattention.NAME


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_row_attends_as_alone_and_close_to_sdpa(fresh_tiny, dtype):
    model, rows = _rows(fresh_tiny)
    with precision.weights_in(model, dtype), torch.no_grad():
        batched = engine.prefill(rows, pad_id=2)
        alone = [engine.prefill([row], pad_id=2) for row in rows]
        model.set_attn_implementation("sdpa")
        try:
            sdpa = engine.prefill(rows, pad_id=2)
        finally:
            model.set_attn_implementation(rowattention.NAME)
    assert batched.mask.eq(0).any()  # the batch is really padded
    for i, one in enumerate(alone):
        if dtype == torch.bfloat16 and precision.bf16_gemm_row_invariant():
            # bitwise where the CPU's bf16 GEMM rounds a row alike at any row count (not AMX: see the probe);
            # fp32's GEMMs (MKL) round by batch shape, ~1e-7 (measured)
            assert torch.equal(batched.logits[i], one.logits[0]), i
        elif dtype == torch.bfloat16:  # AMX: the projections round by row count, attention is still per row
            torch.testing.assert_close(batched.logits[i], one.logits[0], atol=0.1, rtol=0.05)
        else:
            torch.testing.assert_close(batched.logits[i], one.logits[0], atol=1e-5, rtol=1e-5)
    tol = 1e-4 if dtype == torch.float32 else 0.1
    torch.testing.assert_close(batched.logits.float(), sdpa.logits.float(), atol=tol, rtol=tol)


def test_outside_exact_rows_it_is_sdpa(fresh_tiny):
    model, rows = _rows(fresh_tiny)
    ids = torch.tensor([[5, 6, 7, 8], [2, 2, 9, 10]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask).logits
        model.set_attn_implementation("sdpa")
        try:
            sdpa = model(input_ids=ids, attention_mask=mask).logits
        finally:
            model.set_attn_implementation(rowattention.NAME)
    assert torch.equal(ours, sdpa)
    with rowattention.exact_rows():  # gradients on (training): SDPA too
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits.detach(), sdpa)
