"""Training memory of one benchmark step: the bytes a step holds at its peak (parameters, gradients,
AdamW state and the tensors autograd saves; on CUDA the allocator's peak), and the extra bytes of a
sketch-capture (refresh) step. See `structlora.repro.bench`'s docstring for exactly what is counted."""
from __future__ import annotations

from typing import Optional

import torch

from .bench_variants import Bench, Variant

__all__ = ["training_memory", "refresh_extra_bytes"]


def _storage_key(t: torch.Tensor) -> Optional[tuple[int, int]]:
    try:
        st = t.untyped_storage()
        return st.data_ptr(), st.nbytes()
    except Exception:  # noqa: BLE001  (sparse / wrapper tensors)
        return None


def _unique_bytes(tensors) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        key = _storage_key(t)
        if key is not None and key[0] != 0:
            seen[key[0]] = key[1]
    return sum(seen.values())


def training_memory(v: Variant, batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, float]:
    """Bytes held at the peak of one training step (see the module docstring for exactly what)."""
    params = list(v.model.parameters())
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key is not None and key[0] != 0 and key[0] not in param_ptrs:
            saved[key[0]] = key[1]
        return t

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = v.model(**batch).loss
        if v.structlora:
            loss = loss + v.model.structlora_loss()
    loss.backward()
    grad_bytes = _unique_bytes(p.grad for p in params if p.grad is not None)
    v.opt.step()
    v.opt.zero_grad(set_to_none=True)
    opt_bytes = _unique_bytes(t for s in v.opt.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0)
    param_bytes = _unique_bytes(params)
    out = {
        "param_bytes": param_bytes, "trainable_bytes": _unique_bytes(p for p in params if p.requires_grad),
        "grad_bytes": grad_bytes, "optimizer_bytes": opt_bytes, "saved_activation_bytes": sum(saved.values()),
    }
    out["total_bytes"] = param_bytes + grad_bytes + opt_bytes + out["saved_activation_bytes"]
    if cuda:
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        out["cuda_step_peak_bytes"] = peak
        out["total_bytes"] = param_bytes + opt_bytes + peak  # resident + transient peak of the step
    return out


def refresh_extra_bytes(v: Variant, bench: Bench) -> int:
    """Extra bytes of a refresh (sketch-capture) step: (L, d, p) sketches + one (tokens, p) projection per layer."""
    if v.refresh_window == 0:
        return 0
    p, tokens, total = int(v.model.structlora_config.sim_sketch_dim), bench.batch_size * bench.seq_len, 0
    for fam in v.model.families:
        if fam.sketch_proj is not None:
            L, d = len(fam.layers), fam.layers[0].out_features
            total += 4 * (L * d * p + L * tokens * p)
    return total
