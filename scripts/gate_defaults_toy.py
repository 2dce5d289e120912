"""The toy measurement behind README "The gate defaults, and how they were chosen" (issue 21):
gate polarization, closed share, fully open share and logit spread after 300 steps on a tiny BERT, for the
new and the old gate defaults at three learning rates. ``python scripts/gate_defaults_toy.py`` (~1 min)."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from toy import tiny_bert, toy_batch
from structlora import StructLoraConfig, get_structlora_model
from structlora.diagnostics import polarization
torch.set_num_threads(1)
def run(lr, **kw):
    torch.manual_seed(0)
    cfg = StructLoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], task_type="SEQ_CLS", **kw)
    sm = get_structlora_model(tiny_bert(layers=4), cfg)
    opt = torch.optim.AdamW(sm.structlora_param_groups(lr))
    sm.train()
    for step in range(300):
        loss = sm(**toy_batch(n=16, seed=step)).loss + sm.structlora_loss()
        loss.backward(); opt.step(); opt.zero_grad()
    sm.eval()
    m = torch.cat([g.forward(False) for g in sm.gates.values()])
    lg = torch.cat([g.logits.detach() for g in sm.gates.values()])
    acc = float((sm(**toy_batch(n=256, seed=999)).logits.argmax(-1) == toy_batch(n=256, seed=999)["labels"]).float().mean())
    return dict(polar=round(float(polarization(m).mean()), 3), mean_gate=round(float(m.mean()), 3),
                closed=round(float((m == 0).float().mean()), 3), open_ge_09=round(float((m >= 0.9).float().mean()), 3),
                logit_std=round(float(lg.std()), 3), acc=round(acc, 3))
for lr in (5e-4, 2e-3, 5e-3):
    print("lr", lr, "new default", run(lr), flush=True)
    print("lr", lr, "old default", run(lr, target_keep_ratio=None, gate_lr_multiplier=10.0), flush=True)
