"""Every compared method, registered once in the catalogue (`structlora.repro.catalogue.MethodSpec`).

Rows are in the paper's order (Tables 1-2, then 11-12's LoRA-FA and AdaLoRA), then the StructLoRA
variants (Tables 5 and 9, the filter strategies of Fig. 2) and the meta-adapters (appendix F, Table 11).
Table 1 and 2 values are transcribed by hand from ``/work/shared/paper/structlora-paper.txt`` (Table 1:
LLaMA-7B for BoolQ/PIQA, ViT-B/16 for CIFAR-100/ImageNet-1k, LLaVA-1.5-7B for COCO/VQAv2; Table 2: GLUE
with RoBERTa-base, baselines from Zhang et al. 2025a); accuracy in %, CIDEr as printed. Adding a method
is one `register_method` call here (or in a test), plus its builder, tests and params.
"""
from __future__ import annotations

from typing import Any

from ..catalogue import KINDS, MethodSpec, register_method
from .own_methods import (
    ADAPTERFUSION_SKIPPED,
    build_adapter,
    build_adapterfusion,
    build_dylora,
    build_full_ft,
    build_linear_probe,
    build_lora_dropout,
    build_lorafa_structlora,
    build_loraprune,
    build_qlora_structlora,
    build_sensitivity_lora,
    build_structlora,
    build_vera_structlora,
)
from .peft_methods import (
    build_adalora,
    build_dora,
    build_lora,
    build_lora_fa,
    build_prefix,
    build_qlora,
    build_vera,
)

__all__ = ["STRUCTLORA_CONFIG"]


def _t1(boolq: float, piqa: float, cifar100: float, imagenet1k: float, coco_caption: float,
        vqav2: float) -> dict[str, float]:
    """A Table 1 row, in the table's column order."""
    return {"boolq": boolq, "piqa": piqa, "cifar100": cifar100, "imagenet1k": imagenet1k,
            "coco_caption": coco_caption, "vqav2": vqav2}


def _t2(mnli: float, sst2: float, mrpc: float, cola: float, qnli: float, qqp: float, rte: float, stsb: float,
        average: float) -> dict[str, float]:
    """A Table 2 row, in the table's column order."""
    return {"mnli": mnli, "sst2": sst2, "mrpc": mrpc, "cola": cola, "qnli": qnli, "qqp": qqp, "rte": rte,
            "stsb": stsb, "average": average}


_LINEAR_PROBE_LM = ("linear_probe: a causal LM has no classification head to probe (SmolLM2's lm_head is tied "
                    "to the input embeddings), so there is no honest linear-probe baseline")
_PREFIX_IMAGE = ("prefix tuning cannot apply to image-cls models (it prepends key/value prefixes to the attention "
                 "of a text transformer through transformers' cache API)")

# ------------------------------------------------------------------------------------- Tables 1-2 rows
for _spec in (
    MethodSpec("full_ft", build_full_ft, "own", "full fine-tuning (upper bound)", "Full Fine-tuning",
               budget="exempt: upper bound, every parameter trains", paper_row=True,
               table1=_t1(82.6, 85.3, 85.9, 78.8, 123.5, 76.2), table1_type="—"),
    MethodSpec("linear_probe", build_linear_probe, "own", "linear probing (lower bound)", "Linear Probing",
               skipped={"causal-lm": _LINEAR_PROBE_LM}, budget="exempt: lower bound, only the head trains",
               paper_row=True, table1=_t1(71.1, 74.8, 65.7, 68.4, 105.3, 67.0), table1_type="—"),
    MethodSpec("adapter", build_adapter, "own", "Houlsby et al. 2019", "Adapter", budget="matched", paper_row=True,
               table1=_t1(79.2, 82.5, 81.3, 75.7, 116.5, 73.0), table1_type="Additive"),
    MethodSpec("prefix", build_prefix, "peft", "Li & Liang 2021", "Prefix-Tuning", kinds=("seq-cls", "causal-lm"),
               unsupported=_PREFIX_IMAGE, budget="matched", paper_row=True,
               table1=_t1(79.6, 82.8, 81.7, 76.1, 117.0, 73.3), table1_type="Additive"),
    MethodSpec("adapterfusion", build_adapterfusion, "skipped", "Pfeiffer et al. 2021", "AdapterFusion",
               skipped={k: ADAPTERFUSION_SKIPPED for k in KINDS}, budget="matched", paper_row=True),
    MethodSpec("lora", build_lora, "peft", "Hu et al. 2022", "LoRA", paper_row=True,
               table1=_t1(79.1, 82.4, 81.5, 76.2, 116.2, 73.5), table1_type="Reparam.",
               table2=_t2(87.3, 93.5, 87.1, 58.8, 93.0, 90.5, 79.4, 91.0, 85.1)),
    MethodSpec("qlora", build_qlora, "peft", "Dettmers et al. 2023", "QLoRA", needs=("bitsandbytes",), paper_row=True,
               table1=_t1(80.0, 83.1, 82.7, 76.9, 119.1, 74.2), table1_type="Reparam."),
    MethodSpec("dora", build_dora, "peft", "Liu et al. 2024b", "DoRA", paper_row=True,
               table1=_t1(80.6, 83.7, 83.2, 77.3, 120.3, 75.0), table1_type="Reparam."),
    MethodSpec("vera", build_vera, "peft", "Kopiczko et al. 2024", "VeRA",
               budget="exempt: VeRA trains only scaling vectors over shared frozen random projections",
               paper_row=True, table1=_t1(79.8, 83.0, 82.3, 76.4, 118.4, 74.1), table1_type="Reparam."),
    MethodSpec("lora_fa", build_lora_fa, "peft", "Zhang et al. 2023, LoRA-FA (cited as Drost 2024 in Table 11)",
               "LoRA-FA", budget="exempt: LoRA-FA freezes A by design (about half of LoRA's adapter parameters)",
               paper_row=True),
    MethodSpec("adalora", build_adalora, "peft", "Zhang et al. 2023b", "AdaLoRA", needs=("total_steps",),
               budget="exempt: starts at init_r and is pruned to an average rank of target_r during training",
               paper_row=True, table2=_t2(87.3, 93.6, 87.3, 59.0, 93.1, 90.6, 79.6, 91.2, 85.2)),
    MethodSpec("dylora", build_dylora, "own", "Valipour et al. 2023", "DyLoRA", paper_row=True,
               table1=_t1(80.1, 83.5, 82.8, 77.0, 119.5, 74.8), table1_type="Dynamic Rank",
               table2=_t2(87.2, 93.7, 87.3, 59.0, 93.0, 90.6, 79.6, 91.2, 85.2)),
    MethodSpec("sensitivity_lora", build_sensitivity_lora, "own", "Zhang et al. 2025a", "Sensitivity-LoRA",
               needs=("calibration_batches",), calibration_batches=4, paper_row=True,
               table1=_t1(80.9, 84.0, 83.5, 77.5, 120.8, 75.2), table1_type="Dynamic Rank",
               table2=_t2(87.6, 94.6, 87.7, 60.2, 93.6, 90.7, 81.8, 91.3, 86.0)),
    MethodSpec("lora_dropout", build_lora_dropout, "own", "Lin et al. 2024", "LoRA-Dropout", paper_row=True,
               table1=_t1(80.2, 83.3, 82.5, 76.8, 118.8, 74.5), table1_type="Sparsity"),
    MethodSpec("loraprune", build_loraprune, "own", "Zhang et al. 2023a", "LoRAPrune", needs=("total_steps",),
               paper_row=True, table1=_t1(79.8, 82.9, 82.1, 76.6, 118.1, 74.0), table1_type="Sparsity"),
):
    register_method(_spec)

# ------------------------------------------------------------------------------------ StructLoRA family
# Config overrides per variant (any StructLoraConfig field in **kwargs overrides them). penalty_weight 0.1
# for lora_cos / lora_lap and keep_ratio 0.5 for the filter variants are our documented defaults: the paper
# gives no value. The filter variants compare filters only (graph=None); random / top-k-norm masks are fixed,
# so they run without a learned gate. The gated variants close half of each module's directions (target
# keep ratio 0.5, Fig. 2's keep ratio, reached by the augmented Lagrangian of `structlora.gates`) with gate
# logits at 50x the base rate: the configuration whose learning rate the cpu-tier pilot selected
# (scripts/pilot.py). Without a target, lambda_IB alone closed no direction in the protocol-1 runs.
_GATED: dict[str, Any] = {"gate": "concrete", "target_keep_ratio": 0.5, "gate_lr_multiplier": 50.0}
STRUCTLORA_CONFIG: dict[str, Any] = {**_GATED, "graph": "hybrid"}
"""The full method's configuration (Sec. 3): concrete gates (Stage 1) and the hybrid depth graph (Stage 2)."""

register_method(MethodSpec(
    "structlora", build_structlora, "structlora", "this paper", "StructLoRA", config=STRUCTLORA_CONFIG,
    paper_row=True, table1=_t1(82.1, 84.9, 85.1, 78.6, 122.9, 75.9), table1_type="Filtering + Coordination",
    table2=_t2(88.1, 95.0, 88.5, 61.5, 94.1, 91.0, 82.3, 91.5, 86.5)))

# StructLoRA with a stage removed, changed or replaced: they train at StructLoRA's learning rate (lr_from)
for _name, _label, _config in (
    ("structlora_no_gate", "StructLoRA w/o IB filter", {"gate": None, "graph": "hybrid"}),
    ("structlora_no_coord", "StructLoRA w/o GNN coordination", {**_GATED, "graph": None}),
    ("lora_cos", "LoRA+Cos", {"gate": None, "graph": None, "penalty": "cos", "penalty_weight": 0.1}),
    ("lora_lap", "LoRA+Lap", {"gate": None, "graph": None, "penalty": "laplacian", "penalty_weight": 0.1}),
    ("filter_ib", "IB filter", {"gate": "concrete", "filter": "ib", "keep_ratio": 0.5, "graph": None}),
    ("filter_random", "Random masking", {"gate": None, "filter": "random", "keep_ratio": 0.5, "graph": None}),
    ("filter_topk_norm", "Top-k norm", {"gate": None, "filter": "topk_norm", "keep_ratio": 0.5, "graph": None}),
):
    register_method(MethodSpec(_name, build_structlora, "structlora", "this paper", _label, lr_from="structlora",
                               config=_config))

# StructLoRA as a meta-adapter (appendix F, Table 11): the full method on another PEFT method, at its budget
for _spec in (
    MethodSpec("qlora+structlora", build_qlora_structlora, "structlora",
               "this paper, Table 11 (on Dettmers et al. 2023)", "qlora+structlora", needs=("bitsandbytes",),
               config=STRUCTLORA_CONFIG),
    MethodSpec("lorafa+structlora", build_lorafa_structlora, "structlora", "this paper, Table 11 (on LoRA-FA)",
               "lorafa+structlora", config=STRUCTLORA_CONFIG,
               budget="exempt: LoRA-FA's budget (A frozen) plus StructLoRA's gates and coordinator"),
    MethodSpec("vera+structlora", build_vera_structlora, "structlora",
               "this paper, Table 11 (on Kopiczko et al. 2024)", "vera+structlora", config=STRUCTLORA_CONFIG,
               budget="exempt: VeRA's scaling vectors (r=256) plus StructLoRA's gates and coordinator"),
):
    register_method(_spec)
