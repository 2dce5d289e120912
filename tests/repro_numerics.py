"""The reproduction's training numerics, pinned (issue 21): a short training loop shaped like
`structlora.repro.engine.train` (AdamW on `structlora_param_groups`, loss = task + `structlora_loss()`,
one forward per optimizer step, fp32, no checkpointing) for every StructLoRA variant of the registry,
on a tiny BERT with dropout (so the RNG order of gate noise vs. dropout matters).

``python tests/repro_numerics.py`` records ``tests/data/repro_numerics.json`` (done once, on the commit
before issue 21's changes); `test_repro_numerics.py` replays it and demands bit-identical losses and
gradients. Each step stores the loss as a float hex string and a sha256 of every gradient's bytes.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch
from toy import tiny_bert
from transformers import BertForSequenceClassification

from structlora import StructLoraConfig, get_structlora_model
from structlora.repro.methods import method_defaults

FIXTURE = Path(__file__).with_name("data") / "repro_numerics.json"
STEPS = 6
# the registry's StructLoRA variants (what `method_defaults` gives each, as in the run records)
VARIANTS = {
    **{name: method_defaults(name) for name in ("structlora", "structlora_no_gate", "structlora_no_coord",
                                                 "lora_cos", "lora_lap", "filter_ib", "filter_random",
                                                 "filter_topk_norm")},
    # library options the ablations use
    "gaussian_gains": {"gate": "gaussian", "graph": "adjacency", "coordinator": "gains"},
    "similarity_threshold_corrections": {"gate": "concrete", "graph": "similarity", "sim_rule": "threshold",
                                         "sim_threshold": 0.0, "edge_corrections": True},
}
# short schedules so six steps cross every boundary (warm-ups, ramp, refresh, re-scoring)
FAST = {"gate_warmup_steps": 2, "target_ramp_steps": 3, "filter_warmup_steps": 2, "rescore_every": 2,
        "sim_refresh_every": 3, "sim_batches": 1}


def _bert(seed: int = 0) -> BertForSequenceClassification:
    return tiny_bert(4, seed, dropout=0.1, train=True)


def _batch(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(5, 50, (8, 6), generator=g)
    ids[:, 0] = torch.randint(1, 5, (8,), generator=g)
    return {"input_ids": ids, "labels": (ids[:, 0] <= 2).long()}


def run(variant: str, pinned: dict | None = None) -> list[dict[str, str]]:
    """Train ``variant`` for `STEPS` steps; per step the loss (hex) and a sha256 of all gradients."""
    torch.set_num_threads(1)
    kw = {**(pinned or {}), **VARIANTS[variant], **FAST}
    cfg = StructLoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS",
                           lora_dropout=0.1, modules_to_save=["classifier"], structlora_seed=3, **kw)
    sm = get_structlora_model(_bert(), cfg)
    torch.manual_seed(1)
    sm.train()
    opt = torch.optim.AdamW(sm.structlora_param_groups(lr=5e-2, weight_decay=0.01))
    out = []
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        loss = sm(**_batch(step)).loss + sm.structlora_loss()
        loss.backward()
        h = hashlib.sha256()
        for name, p in sm.named_parameters():
            if p.grad is not None:
                h.update(name.encode())
                h.update(p.grad.detach().contiguous().numpy().tobytes())
        out.append({"loss": float(loss).hex(), "grads": h.hexdigest()})
        opt.step()
    return out


if __name__ == "__main__":
    data = {"torch": torch.__version__, "steps": {v: run(v) for v in VARIANTS}}
    FIXTURE.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {FIXTURE}", file=sys.stderr)
