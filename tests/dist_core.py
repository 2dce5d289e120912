"""Run by tests/test_core.py under `torchrun --nproc_per_node 2`: DDP (gloo) training of a toy StructLoRA model
with the hybrid graph (similarity edges refreshed from all-reduced gradient sketches). Each rank saves its state."""
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).parent))
from toy import tiny_bert, toy_batch  # noqa: E402

from structlora import StructLoraConfig, get_structlora_model  # noqa: E402

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
cfg = StructLoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS", gate="concrete",
                       graph="hybrid", sim_refresh_every=3, sim_batches=1, sim_threshold=0.0)
sm = get_structlora_model(tiny_bert(), cfg)
start_B = sm.families[0].B(1).detach().clone()
model = DDP(sm)
opt = torch.optim.AdamW(sm.structlora_param_groups(1e-2, 0.01))
torch.manual_seed(100 + rank)  # different gate noise per rank: gradients are averaged anyway
for step in range(8):
    batch = toy_batch(n=8, seed=1000 * rank + step)  # each rank sees its own shard
    loss = model(**batch).loss + sm.structlora_loss()
    loss.backward()
    opt.step()
    opt.zero_grad()
state = {k: v.detach().clone() for k, v in sm.state_dict().items()}
state["start_B"], state["end_B"] = start_B, sm.families[0].B(1).detach().clone()
torch.save(state, Path(sys.argv[1]) / f"rank{rank}.pt")
dist.destroy_process_group()
