"""The README's training-regime snippets run as printed and match their plain counterparts (issue 21):

* "Half precision, gradient checkpointing, gradient accumulation": with the base in fp32 the block's
  first-step gradients equal those of one fp32 batch of 8 without checkpointing or accumulation
  (< 1e-5); as printed (bf16 base) they are within 3% of the largest gradient entry.
* the Trainer example with ``gradient_accumulation_steps=4`` and batches of 2 ends with the parameters of
  batches of 8 without accumulation (< 1e-5; the base without dropout, whose masks would differ).
"""
from __future__ import annotations

import pytest
import torch

from test_peft_citizen import _README_PRELUDE, _readme_blocks

pytestmark = pytest.mark.usefixtures("one_thread")

PRELUDE = """
import torch
from toy import family_batch, tiny_family

def make_llama():
    return tiny_family("llama")

batch8 = family_batch("llama", n=8)
loader = [{k: v[i:i + 2] for k, v in batch8.items()} for i in range(0, 8, 2)]   # one step of 4 micro-batches
"""


def _block() -> str:
    blocks = _readme_blocks("## Using StructLoRA on your own model")
    block = next((b for b in blocks if "activation_checkpointing_enable" in b), None)
    assert block is not None, "the README's half-precision / checkpointing / accumulation block is missing"
    return block


def _step_grads(code: str) -> dict[str, torch.Tensor]:
    """Run ``code`` and return the gradients its optimizer steps with (the first step)."""
    seen: dict[str, torch.Tensor] = {}

    def capture(opt, args, kwargs):
        if not seen:
            seen.update({str(i): p.grad.detach().float().clone() for i, p in
                         enumerate(p for g in opt.param_groups for p in g["params"]) if p.grad is not None})

    from torch.optim.optimizer import register_optimizer_step_pre_hook

    handle = register_optimizer_step_pre_hook(capture)
    try:
        torch.manual_seed(0)
        exec(compile(PRELUDE + code, "README-regimes", "exec"), {})
    finally:
        handle.remove()
    return seen


def _reference_grads() -> dict[str, torch.Tensor]:
    """fp32, no checkpointing, one batch of 8, same model and RNG stream as the block."""
    from structlora import StructLoraConfig, get_structlora_model
    from toy import family_batch, tiny_family

    torch.manual_seed(0)
    model = get_structlora_model(tiny_family("llama"), StructLoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    groups = model.structlora_param_groups(lr=5e-4)
    model.train()
    (model(**family_batch("llama", n=8)).loss + model.structlora_loss()).backward()
    params = [p for g in groups for p in g["params"]]
    return {str(i): p.grad.detach().float().clone() for i, p in enumerate(params) if p.grad is not None}


def test_readme_regimes_block_in_fp32_equals_the_plain_run():
    got = _step_grads(_block().replace("torch.bfloat16", "torch.float32"))
    ref = _reference_grads()
    assert got.keys() == ref.keys()
    assert max(float((got[k] - ref[k]).abs().max()) for k in ref) < 1e-5


def test_readme_regimes_block_as_printed_is_within_bf16_rounding():
    got, ref = _step_grads(_block()), _reference_grads()
    assert got.keys() == ref.keys()
    for k in ref:
        assert float((got[k] - ref[k]).abs().max()) <= 0.03 * float(ref[k].abs().max()) + 1e-8, k


# dropout draws other masks for 4 micro-batches than for one batch: compare without it
NO_DROPOUT = _README_PRELUDE.replace("num_labels=2))", "num_labels=2, hidden_dropout_prob=0.0,\n"
                                     "        attention_probs_dropout_prob=0.0))")


def test_readme_trainer_accumulation_equals_one_batch(tmp_path, monkeypatch):
    from transformers import BertForSequenceClassification

    assert NO_DROPOUT != _README_PRELUDE
    # BERT's classification loss ignores num_items_in_batch, so the Trainer must divide it by the accumulation
    # steps itself: transformers' rule, told by accepts_loss_kwargs = False (the README says so)
    monkeypatch.setattr(BertForSequenceClassification, "accepts_loss_kwargs", False, raising=False)
    block = _readme_blocks("## Using StructLoRA on your own model")[1]
    accumulated = "per_device_train_batch_size=2, gradient_accumulation_steps=4,"
    assert accumulated in block
    params = []
    for i, code in enumerate([block, block.replace(accumulated, "per_device_train_batch_size=8,")]):
        (tmp_path / str(i)).mkdir()
        monkeypatch.chdir(tmp_path / str(i))
        scope: dict = {}
        exec(compile(NO_DROPOUT + code, "README-trainer-example", "exec"), scope)
        params.append({n: p.detach().clone() for n, p in scope["trainer"].model.named_parameters() if p.requires_grad})
    assert params[0].keys() == params[1].keys()
    assert max(float((params[0][k] - params[1][k]).abs().max()) for k in params[0]) < 1e-5
