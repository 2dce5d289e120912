"""Every method the reproduction compares: `specs` registers each once in the catalogue
(`structlora.repro.catalogue`), `registry` builds them by name; `peft_methods` / `own_methods` hold the
builders; and the baselines of the paper that peft does not provide, each built on top of a peft LoRA model (or, for
adapters, on the plain model) so that peft's save / merge keep working. `registry` builds every
compared method (peft's and these) by name.

- :mod:`.dylora` -- DyLoRA (Valipour et al. 2023), nested-rank training.
- :mod:`.lora_dropout` -- LoRA-Dropout (Lin et al. 2024), parameter dropout on A's columns / B's rows.
- :mod:`.sensitivity_lora` -- Sensitivity-LoRA (Zhang et al. 2025a), Fisher-proxy rank allocation.
- :mod:`.loraprune` -- LoRAPrune (Zhang et al. 2023a), LoRA-gradient-guided structured pruning.
- :mod:`.adapter` -- Houlsby bottleneck adapters (Houlsby et al. 2019), our own small implementation.
"""
from . import registry, specs  # noqa: F401  (specs registers every method in the catalogue)
from .registry import *  # noqa: F401,F403  (re-exported: build_method, list_methods, ...)

from .adapter import BottleneckAdapter, add_bottleneck_adapters, bottleneck_for_budget, find_adapter_sites
from .dylora import DyLoRAController, apply_dylora
from .lora_dropout import LoRADropoutController, apply_lora_dropout
from .loraprune import LoRAPruneController, apply_loraprune, cubic_sparsity
from .sensitivity_lora import allocate_ranks, estimate_sensitivity, rank_and_alpha_patterns

__all__ = registry.__all__ + [
    "BottleneckAdapter",
    "DyLoRAController",
    "LoRADropoutController",
    "LoRAPruneController",
    "add_bottleneck_adapters",
    "allocate_ranks",
    "apply_dylora",
    "apply_lora_dropout",
    "apply_loraprune",
    "bottleneck_for_budget",
    "cubic_sparsity",
    "estimate_sensitivity",
    "find_adapter_sites",
    "rank_and_alpha_patterns",
]
