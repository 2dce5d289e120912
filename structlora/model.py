"""`get_structlora_model`: a peft LoRA model whose LoRA layers are gated (Stage 1) and coordinated across
depth (Stage 2), paper Sec. 3 and appendix E. Notation follows peft: A = lora_A.weight (r x k),
B = lora_B.weight (d x r), s = lora_alpha / r; the paper's "A B" is peft's "B A".

Each adapted layer l of a module family computes, in one low-rank product,

    y = W0 x + B_cat diag(coef) A_cat x,      A_cat = [A_j; ...] (n r x k),  B_cat = [B_j, ...] (d x n r)
    coef = [M_lj s_j m_j for j in N_T(l)]    (n r,)

where m_j are the gates of layer j (Eq. 2) and M is the coordinator's mixing matrix (coordinator.py).
With no gate and no graph, n = 1 and coef = s: exactly peft LoRA. The coordinated factors are also
what `export.py` writes, so the merged/exported model equals the trained model at eval.

The layers are peft's `lora.Linear`, which wraps both `nn.Linear` and transformers' `Conv1D` (GPT-2;
there peft forces ``fan_in_fan_out=True``). A (r x k) and B (d x r) have the same orientation for both,
only W0's storage differs, so the forward needs no case and merging transposes per layer. The config
StructLoRA keeps is the one peft corrected (`StructLoraModel.structlora_config`).

Two ways to save (`export.py`): `save_pretrained` writes the *folded* export (a plain LoRA adapter,
gates and coordinator folded in, for inference in vanilla peft); `save_training_state` writes the raw
peft adapter plus the StructLoRA state, which `StructLoraModel.from_pretrained` and the Trainer
checkpoints of `integrations.StructLoraTrainer` use to continue training.

What peft is accepted and refused is `peft_checks`; the optimizer grouping every method shares is
`optim.param_groups` (both re-exported here). This module stays over 400 lines because `StructLoraModel`
is one class (about 410 lines: the peft wrapper, the stage schedules, the factors, save / load) and the
forward patched into peft's layers reads its per-family state (`layer_factors`, `_eval_factors`), so it
stays beside it.
"""
from __future__ import annotations

import contextlib
import os
import types
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model
from torch import nn

from . import diagnostics, export
from .config import StructLoraConfig
from .coordinator import DepthCoordinator, maybe_allreduce, sketch_cosines
from .gates import FamilyGate
from .layers import (ADAPTER, LoraLinear, check_supported, factor_A, factor_B, family_links, group_lora_layers,
                     layer_dropout, layer_scaling)
from .lowrank import cos_penalty, laplacian_penalty
from .optim import param_groups
from .peft_checks import REFUSED_PEFT_APIS, check_peft_config, refused_api, synced_config

__all__ = ["StructLoraModel", "get_structlora_model", "Family", "param_groups", "REFUSED_PEFT_APIS"]


@dataclass
class Family:
    """One module family (e.g. all ``query`` projections), ordered by depth."""

    key: str
    names: list[str]
    layers: list[LoraLinear]
    gate: FamilyGate
    coord: Optional[DepthCoordinator]
    sketch_proj: Optional[torch.Tensor] = None      # (k, p) fixed random projection R
    sketches: Optional[torch.Tensor] = None         # (L, d, p) accumulated G_l R, fp32
    capturing: bool = False
    captured: int = 0
    state: Optional[dict[str, Any]] = field(default=None, repr=False)

    @property
    def scalings(self) -> torch.Tensor:
        return torch.tensor([layer_scaling(layer) for layer in self.layers])

    def A(self, l: int) -> torch.Tensor:
        return factor_A(self.layers[l])  # (r, k)

    def B(self, l: int) -> torch.Tensor:
        return factor_B(self.layers[l])  # (d, r); VeRA: diag(lambda_b) B diag(lambda_d)


class StructLoraModel(nn.Module):
    """A peft LoRA model with IB gates and a depth coordinator. Forward is the peft model's forward.

    Extra API: `structlora_loss()` (add it to the task loss), `structlora_param_groups()`,
    `effective_factors()`, `structlora_report()`, `save_pretrained()` (folded export),
    `save_training_state()` / `load_training_state()` / `from_pretrained()` (resumable), `merge_and_unload()`.
    peft's `print_trainable_parameters()` / `get_nb_trainable_parameters()` count gates and gains too;
    `train()` / `eval()` set the wrapped peft model's mode (a new wrapper starts in the base model's mode).

    Steps: step-driven work (warm-ups, ramp, dual ascent, re-scoring, similarity refresh) and the gate
    noise advance once per training step. A step is one training forward, unless an optimizer is attached
    (`attach_optimizer`, which `StructLoraTrainer` does): then a step is one optimizer step, however many
    forwards (accumulated micro-batches) it takes, and every forward of a step reuses its gate noise.
    Under gradient checkpointing (any module of the base model with ``gradient_checkpointing`` set) the
    noise is drawn before the forward and each layer computes its gates and mixing itself, so the
    recompute sees exactly what the forward saw (both ``use_reentrant`` modes).
    """

    def __init__(self, peft_model: PeftModel, config: StructLoraConfig) -> None:
        super().__init__()
        check_supported(peft_model)   # before anything reads the peft config: a clear error for other tuners
        self.peft_model = peft_model
        self.structlora_config = config = synced_config(config, peft_model)
        check_peft_config(config, peft_model)
        self.gates = nn.ModuleDict()
        self.coordinators = nn.ModuleDict()
        self.register_buffer("structlora_step", torch.zeros((), dtype=torch.long))
        self.families: list[Family] = []
        self._share = False       # layers reuse one family state (set inside one forward without checkpointing)
        self._counting = False    # an optimizer is attached: steps are optimizer steps
        self._step_open = False   # (counting) a step has begun and its optimizer step has not run yet
        self._attached: dict[int, Any] = {}   # id(optimizer) -> hook handle
        groups = group_lora_layers(peft_model)
        if not groups:
            raise ValueError("no LoRA/VeRA linear layers were created: check target_modules (StructLoRA adapts "
                             "peft LoRA/VeRA layers over nn.Linear, Conv1D or bitsandbytes Linear4bit)")
        for i, (key, members) in enumerate(groups.items()):
            names = [n for n, _ in members]
            layers = [m for _, m in members]
            self._check_family(key, names, layers)
            r = layers[0].r[ADAPTER]
            gate = FamilyGate(len(layers), r, config.gate, config.filter, config.keep_count, config.gate_init,
                              config.gate_temperature, config.gate_sigma, seed=config.structlora_seed + i,
                              target=config.target_keep_ratio)
            gate.hold = config.gate_warmup_steps > 0 and config.gate is not None
            # a one-layer family has nothing to coordinate: no coordinator (the report says so)
            coord = (DepthCoordinator(len(layers), config.graph, config.gnn_steps, mode=config.coordinator,
                                      eta_init=config.eta_init, learn_eta=config.learn_eta,
                                      edge_corrections=config.edge_corrections, sim_rule=config.sim_rule,
                                      sim_k=config.sim_k, sim_threshold=config.sim_threshold, sim_ema=config.sim_ema,
                                      links=family_links(peft_model, names))
                     if config.graph and len(layers) > 1 else None)
            slot = f"family{i}"
            self.gates[slot] = gate
            if coord is not None:
                self.coordinators[slot] = coord
            fam = Family(key, names, layers, gate, coord)
            if config.graph in ("similarity", "hybrid") and coord is not None:
                k = layers[0].in_features
                gen = torch.Generator().manual_seed(config.structlora_seed + 1000 + i)
                fam.sketch_proj = torch.randn(k, config.sim_sketch_dim, generator=gen) / config.sim_sketch_dim**0.5
            self.families.append(fam)
            for l, layer in enumerate(layers):
                _patch_layer(self, fam, l, layer)
        self.check_finite()
        # a fresh nn.Module (this one, and a fresh PeftModel) says training=True whatever the base model's
        # dropout does; start in the base model's mode so `training` and every dropout agree
        self.train(peft_model.get_base_model().training)

    # ------------------------------------------------------------------ construction checks
    def _check_family(self, key: str, names: list[str], layers: list[LoraLinear]) -> None:
        for name, layer in zip(names, layers):
            if getattr(layer, "use_dora", {}).get(ADAPTER, False) or ADAPTER in getattr(layer, "lora_variant", {}):
                raise ValueError(f"{name}: LoRA variants (DoRA, ...) are not supported by StructLoRA")

    def check_finite(self) -> None:
        """Raise when a LoRA factor, gate logit or coordinator parameter is NaN/inf, naming every one that is.

        One fused norm over all of them (a single host sync), so it runs at every training step; the
        detailed search runs only when that norm is not finite."""
        tensors = [t for fam in self.families for l in range(len(fam.layers)) for t in (fam.A(l), fam.B(l))]
        tensors += [p for p in list(self.gates.parameters()) + list(self.coordinators.parameters())]
        norms = torch._foreach_norm([t.detach().float() for t in tensors])
        if bool(torch.stack([n.to(norms[0].device) for n in norms]).isfinite().all()):
            return
        bad = {"LoRA factors": [name for fam in self.families for l, name in enumerate(fam.names)
                                if not (torch.isfinite(fam.A(l)).all() and torch.isfinite(fam.B(l)).all())],
               "gate logits": [fam.names[i] for fam in self.families if fam.gate.logits is not None
                               for i in (~torch.isfinite(fam.gate.logits)).any(-1).nonzero().flatten().tolist()],
               "coordinator": [fam.key for fam in self.families
                               if fam.coord is not None and not fam.coord.parameters_finite()]}
        bad = {kind: names for kind, names in bad.items() if names}
        if bad:
            where = "; ".join(f"{kind} of {len(names)} module(s)/families {names[:3]}{' ...' if len(names) > 3 else ''}"
                              for kind, names in bad.items())
            raise FloatingPointError(
                f"non-finite values at StructLoRA step {int(self.structlora_step)}: {where}. They appear together "
                "when the loss or a gradient diverged in the previous step (learning rate, fp16 overflow): check the loss first")

    # ------------------------------------------------------------------ forward
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        training = self.training and torch.is_grad_enabled()
        if training and not (self._counting and self._step_open):
            self._begin_step()
        checkpointing = training and _checkpointing(self.peft_model.get_base_model())
        if checkpointing:   # draw the noise outside every checkpointed region: the recompute reuses it
            for fam in self.families:
                if fam.gate.kind is not None:
                    fam.gate.step_noise()
        with self._shared_states(not checkpointing):
            return self.peft_model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """peft's ``generate`` (the StructLoRA layers act in every decoding step; one family state per call)."""
        with self._shared_states(True):
            return self.peft_model.generate(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "peft_model":
                raise
            if name in REFUSED_PEFT_APIS:
                return refused_api(name)
            return getattr(self.peft_model, name)

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """peft's ``set_adapter``: StructLoRA has the one adapter ``"default"``; any other name is refused."""
        if adapter_name not in (ADAPTER, [ADAPTER]):
            raise ValueError(f"StructLoRA trains one adapter, {ADAPTER!r}; set_adapter({adapter_name!r}) is not supported "
                             "(several active adapters would bypass the gates and the coordinator)")
        self.peft_model.set_adapter(ADAPTER)

    def train(self, mode: bool = True) -> "StructLoraModel":
        self.reset_states()
        return super().train(mode)

    def reset_states(self) -> None:
        """Drop every family's per-forward state (gate sample, mixed factors): the next forward recomputes it."""
        for fam in self.families:
            fam.state = None

    @contextlib.contextmanager
    def _shared_states(self, share: bool) -> Iterator[None]:
        """While inside, the layers of a family share one state (gates, mixing) when ``share``; else each
        layer computes its own (gradient checkpointing: the recompute must not depend on another layer)."""
        previous = self._share
        self.reset_states()
        self._share = share
        try:
            yield
        finally:
            self._share = previous
            self.reset_states()

    # ------------------------------------------------------------------ steps
    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Count StructLoRA's steps as ``optimizer``'s steps: the one call a training loop with gradient
        accumulation makes, once, before training (`StructLoraTrainer` makes it itself).

        Afterwards every schedule (gate / filter warm-up, target ramp, dual ascent, top-k re-scoring,
        similarity refresh) advances once per ``optimizer.step()``, and the forwards between two steps
        share one gate-noise sample, so accumulating 4 micro-batches of 2 gives the gradients of one batch of
        8. Without it each training forward is a step (right without accumulation). Accelerate's wrapped
        optimizer is unwrapped; attaching the same optimizer twice is a no-op."""
        optimizer = getattr(optimizer, "optimizer", optimizer)
        if id(optimizer) in self._attached:
            return
        ref = weakref.ref(self)

        def stepped(*_: Any) -> None:
            model = ref()
            if model is not None:
                model._step_open = False

        self._attached[id(optimizer)] = optimizer.register_step_post_hook(stepped)
        self._counting, self._step_open = True, False

    def _begin_step(self) -> None:
        """A new training step: fresh gate noise, then the step-driven work."""
        self._step_open = True
        for fam in self.families:
            fam.gate.new_step()
        self._on_train_forward()

    def _on_train_forward(self) -> None:
        """Step-driven work: filter masks after warm-up, top-k-norm re-scoring, similarity refresh."""
        cfg, step = self.structlora_config, int(self.structlora_step)
        for fam in self.families:
            fam.gate.hold = step < cfg.gate_warmup_steps
            if cfg.target_keep_ratio is not None and not fam.gate.hold:
                fam.gate.dual_step(self.target_now(), cfg.lagrangian_lr)
            if cfg.keep_ratio is not None and step >= cfg.filter_warmup_steps:
                fam.gate.mask_active.fill_(True)
                if cfg.filter == "topk_norm" and (step - cfg.filter_warmup_steps) % cfg.rescore_every == 0:
                    fam.gate.rescore_topk_norm(self._direction_norms(fam))
            if fam.sketch_proj is not None:
                if fam.capturing and fam.captured >= cfg.sim_batches:
                    cos = sketch_cosines(maybe_allreduce(fam.sketches))
                    fam.coord.set_similarity(cos)
                    fam.capturing, fam.sketches = False, None
                if step % cfg.sim_refresh_every == 0:
                    fam.capturing, fam.captured = True, 0
                    d, p = fam.layers[0].out_features, cfg.sim_sketch_dim
                    fam.sketches = torch.zeros(len(fam.layers), d, p, device=fam.A(0).device)
                if fam.capturing:
                    fam.captured += 1
        self.check_finite()
        self.structlora_step += 1

    @torch.no_grad()
    def _direction_norms(self, fam: Family) -> torch.Tensor:
        """(L, r) ||b_j|| * ||a_j|| per direction (the Top-k Norm score of Fig. 2)."""
        return torch.stack([fam.B(l).norm(dim=0) * fam.A(l).norm(dim=1) for l in range(len(fam.layers))])

    def family_state(self, fam: Family, training: Optional[bool] = None) -> dict[str, Any]:
        """State of a family: gates m (L, r), mixing M (L, L), neighbour lists; in ``training`` mode (default:
        the model's) the gates use the step's noise. Shared by the family's layers within one forward
        (`_shared_states`), else computed per call."""
        training = self.training if training is None else training
        if fam.state is not None and fam.state["training"] == training:
            return fam.state
        if (not training and fam.gate.keep is not None and self.structlora_config.filter == "topk_norm"
                and not bool(fam.gate.mask_active)):
            fam.gate.rescore_topk_norm(self._direction_norms(fam))
        m = fam.gate(training)                               # (L, r) or None
        mix = fam.coord.mixing() if fam.coord is not None else None   # (L, L) or None
        nbrs = fam.coord.neighbours() if fam.coord is not None else None   # L lists of layer indices
        state = {"m": m, "mix": mix, "nbrs": nbrs, "s": fam.scalings.to(fam.A(0).device), "training": training}
        if self._share:
            fam.state = state
        return state

    def layer_factors(self, fam: Family, l: int,
                      training: Optional[bool] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A_cat (n r, k), coef (n r,), B_cat (d, n r)) such that dW_l = B_cat diag(coef) A_cat (Eq. 2, 4)."""
        st = self.family_state(fam, training)
        m, mix, s = st["m"], st["mix"], st["s"]
        if mix is None:
            coef = s[l] * (m[l] if m is not None else torch.ones_like(fam.A(l)[:, 0]))
            return fam.A(l), coef, fam.B(l)
        js = st["nbrs"][l]
        r = fam.A(l).shape[0]
        gm = m[js] if m is not None else torch.ones(len(js), r, device=s.device)         # (n, r)
        coef = (mix[l, js] * s[js])[:, None] * gm                                         # (n, r)
        a_cat = torch.cat([fam.A(j) for j in js], dim=0)                                  # (n r, k)
        b_cat = torch.cat([fam.B(j) for j in js], dim=1)                                  # (d, n r)
        return a_cat, coef.reshape(-1), b_cat

    # ------------------------------------------------------------------ losses and optimisation
    def structlora_loss(self) -> torch.Tensor:
        """lambda_IB * L_IB (Eq. 8, summed over modules) + the keep-ratio Lagrangian + the static penalty
        weight * L_cos / L_lap (Eq. 9-10); 0 if none, and 0 in eval mode (a regulariser of training).
        The gate terms are off while the gates are held (the first ``gate_warmup_steps`` training steps).

        Add it once per forward, scaled like the task loss: with gradient accumulation over n micro-batches
        divide both by n (the Trainer does), so lambda_IB stays the price per optimizer step."""
        cfg = self.structlora_config
        device = self.families[0].A(0).device
        loss = torch.zeros((), device=device)
        if not self.training:
            return loss
        held = any(fam.gate.hold for fam in self.families)   # set per training forward (_on_train_forward)
        if cfg.gate is not None and not held:
            if cfg.lambda_ib > 0:
                loss = loss + cfg.lambda_ib * sum(fam.gate.module_compression().sum() for fam in self.families)
            if cfg.target_keep_ratio is not None:
                rho_t = self.target_now()
                loss = loss + sum(fam.gate.lagrangian(rho_t, cfg.lagrangian_mu) for fam in self.families)
        if cfg.penalty is not None and cfg.penalty_weight > 0:
            fn = cos_penalty if cfg.penalty == "cos" else laplacian_penalty
            with self._shared_states(True):
                for fam in self.families:
                    if len(fam.layers) > 1:
                        factors = [self.uncoordinated_layer_factors(fam, l) for l in range(len(fam.layers))]
                        loss = loss + cfg.penalty_weight * fn(factors)
        return loss

    def target_now(self) -> Optional[float]:
        """The keep-ratio target of the current step: 1 until the gate warm-up ends, then linear to
        ``target_keep_ratio`` over ``target_ramp_steps`` (the CoFi schedule), then constant; None without a target."""
        cfg = self.structlora_config
        if cfg.target_keep_ratio is None:
            return None
        done = (int(self.structlora_step) - cfg.gate_warmup_steps) / max(cfg.target_ramp_steps, 1)
        return 1.0 - (1.0 - cfg.target_keep_ratio) * min(max(done, 0.0), 1.0)

    def uncoordinated_layer_factors(self, fam: Family, l: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B_eff (d, r), A (r, k)) of the filtered update dW~_l = s B diag(m) A (no coordination)."""
        m = self.family_state(fam)["m"]
        coef = fam.scalings[l] * (m[l] if m is not None else 1.0)
        return fam.B(l) * coef, fam.A(l)

    def structlora_extra_groups(self, lr: float) -> list[dict[str, Any]]:
        """StructLoRA's own AdamW groups (no decay): gate logits and Lagrange multipliers (gradient ascent,
        see `gates`) at ``gate_lr_multiplier * lr``, the coordinator's parameters (theta, corrections or
        gains) at ``coordinator_lr_multiplier * lr``. Frozen parameters are left out."""
        cfg = self.structlora_config
        gate_params = [p for p in self.gates.parameters() if p.requires_grad]
        gain_params = [p for p in self.coordinators.parameters() if p.requires_grad]
        groups = []
        if gate_params:
            groups.append({"params": gate_params, "lr": lr * cfg.gate_lr_multiplier, "weight_decay": 0.0})
        if gain_params:
            groups.append({"params": gain_params, "lr": lr * cfg.coordinator_lr_multiplier, "weight_decay": 0.0})
        return groups

    def structlora_param_groups(self, lr: float, weight_decay: float = 0.01) -> list[dict[str, Any]]:
        """AdamW groups by the one shared policy (`param_groups`: decay on matrices, incl. LoRA factors and
        the head weight; none on biases / LayerNorm / vectors) plus `structlora_extra_groups`. Frozen
        parameters (LoRA-FA's A, VeRA's projections) are in no group."""
        return param_groups(self, lr, weight_decay, extra=self.structlora_extra_groups(lr))

    # ------------------------------------------------------------------ export-facing views
    @torch.no_grad()
    def effective_factors(self, drop_zero: bool = True) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Eval-mode factors per module name: (B_eff (d, r'), A_eff (r', k)), dW = B_eff A_eff exactly.

        Gates, scaling and coordinator mixing are folded into B_eff; directions whose coefficient is
        exactly 0 (closed gates, zero gains) are dropped when ``drop_zero``.
        """
        out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        with self._shared_states(True):
            for fam in self.families:
                for l, name in enumerate(fam.names):
                    out[name] = self._eval_factors(fam, l, drop_zero)
        return out

    @torch.no_grad()
    def _eval_factors(self, fam: Family, l: int, drop_zero: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(B_eff (d, r'), A_eff (r', k)) of layer l at eval (see `effective_factors`)."""
        a_cat, coef, b_cat = self.layer_factors(fam, l, training=False)
        keep = coef != 0 if drop_zero else torch.ones_like(coef, dtype=torch.bool)
        return (b_cat * coef)[:, keep].clone(), a_cat[keep].clone()

    def structlora_report(self) -> "diagnostics.Report":
        """Rows (printable; ``.to_pandas()``): per module, directions kept / r, exported rank, ||dW||, plus E and CosAdj per family."""
        return diagnostics.structlora_report(self)

    # ------------------------------------------------------------------ peft conventions
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts, as peft's: LoRA factors, head, gate logits, coordinator parameters."""
        trainable, total = self.peft_model.get_nb_trainable_parameters()
        for p in list(self.gates.parameters()) + list(self.coordinators.parameters()):
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
        return trainable, total

    def print_trainable_parameters(self) -> None:
        """Print the counts of `get_nb_trainable_parameters` in peft's format."""
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    def save_pretrained(self, save_directory: str | os.PathLike, compress_rank: Optional[int] = None, *,
                        safe_serialization: bool = True, selected_adapters: Optional[list[str]] = None,
                        save_embedding_layers: str | bool = "auto", is_main_process: bool = True,
                        path_initial_model_for_weight_conversion: Optional[str] = None,
                        svd_tol: float = 0.0) -> Optional[dict[str, Any]]:
        """Write the folded export: a standard peft LoRA adapter at the exported ranks (gates, scaling and
        coordinator folded in) that vanilla ``PeftModel.from_pretrained(base, dir)`` loads with the eval
        outputs of this model; see `export.save_adapter`. Returns its summary (None off the main process).

        Takes peft's keywords: ``safe_serialization`` must be True (safetensors only),
        ``selected_adapters`` None or ``["default"]`` (one adapter), ``is_main_process=False`` writes
        nothing. This file cannot resume training: use `save_training_state` (the Trainer does).
        """
        if not safe_serialization:
            raise ValueError("StructLoRA writes safetensors only: safe_serialization=False is not supported")
        if selected_adapters is not None and list(selected_adapters) != [ADAPTER]:
            raise ValueError(f"StructLoRA has one adapter, {ADAPTER!r}; got selected_adapters={selected_adapters!r}")
        if path_initial_model_for_weight_conversion is not None:
            raise ValueError("path_initial_model_for_weight_conversion (PiSSA/OLoRA conversion) is not supported")
        if not is_main_process:
            return None
        return export.save_adapter(self, save_directory, compress_rank=compress_rank, svd_tol=svd_tol,
                                   save_embedding_layers=save_embedding_layers)

    def save_training_state(self, save_directory: str | os.PathLike, is_main_process: bool = True) -> None:
        """Write what resumes training: the raw peft adapter (``peft_model.save_pretrained``) and the
        StructLoRA state and config; see `export.save_training_state`. Load with `from_pretrained`."""
        if is_main_process:
            export.save_training_state(self, save_directory)

    def load_training_state(self, save_directory: str | os.PathLike) -> None:
        """Restore, in place, what `save_training_state` wrote (LoRA factors, head, gates, coordinator,
        step counter, capture state). The directory's config must describe this model's structure."""
        export.load_training_state(self, save_directory)

    @classmethod
    def from_pretrained(cls, model: nn.Module, save_directory: str | os.PathLike, is_trainable: bool = False,
                        **peft_kwargs: Any) -> "StructLoraModel":
        """Rebuild a StructLoraModel on ``model`` (a fresh base) from a `save_training_state` directory
        (also every `StructLoraTrainer` checkpoint and ``save_model`` output).

        ``is_trainable=False`` (peft's default) freezes everything and puts the model in eval mode;
        ``True`` keeps the factors, head, gates and gains trainable so training can go on. A folded
        export (`save_pretrained`) is a plain LoRA adapter: load it with ``PeftModel.from_pretrained``.
        """
        config = export.read_training_config(save_directory)
        peft_model = PeftModel.from_pretrained(model, str(save_directory), is_trainable=is_trainable, **peft_kwargs)
        out = cls(peft_model, config)
        out.load_training_state(save_directory)
        if not is_trainable:
            out.gates.requires_grad_(False)
            out.coordinators.requires_grad_(False)
        return out

    def merge_and_unload(self) -> nn.Module:
        """Plain base model with the coordinated, gated update merged into W0 (eval outputs unchanged)."""
        return export.merge_and_unload(self)


def _patch_layer(owner: StructLoraModel, fam: Family, l: int, layer: nn.Module) -> None:
    """Give one peft layer StructLoRA's ``forward`` and ``get_delta_weight``, as methods bound to the layer
    (so ``copy.deepcopy`` of the model gives a copy whose layers act on the copy) reading ``(owner, family,
    index)`` from the layer's plain attribute ``_structlora``."""
    layer._structlora = (owner, fam, l)
    layer.forward = types.MethodType(_layer_forward, layer)
    layer.get_delta_weight = types.MethodType(_layer_delta_weight, layer)


def _layer_forward(layer: LoraLinear, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """The replacement forward of one peft `lora.Linear`: base + one concatenated low-rank product.

    Also right for a Conv1D base (GPT-2): ``base_layer(x)`` applies W0 in its own storage order, and
    A, B are (r, k), (d, r) as for nn.Linear, so the low-rank path needs no transpose."""
    owner, fam, l = layer._structlora
    if layer.disable_adapters or layer.merged or ADAPTER not in layer.active_adapters:
        return type(layer).forward(layer, x, *args, **kwargs)
    if len(layer.active_adapters) > 1:
        raise ValueError(f"{fam.names[l]}: adapters {layer.active_adapters} are active; StructLoRA runs its one "
                         f"adapter {ADAPTER!r} (set_adapter({ADAPTER!r}))")
    base_rows = _base_rows(kwargs.pop("adapter_names", None), x)   # (batch,) bool or None
    result = layer.base_layer(x, *args, **kwargs)                        # (..., d)
    a_cat, coef, b_cat = owner.layer_factors(fam, l)
    x = layer._cast_input_dtype(x, a_cat.dtype)
    h = F.linear(layer_dropout(layer)(x), a_cat)                  # (..., n r)
    # scale B's columns, not h: saves one (tokens, n r) activation per layer (benchmarks/README.md)
    # a 4-bit or half-precision base returns its own dtype: cast the update to it, as peft does
    out = result + F.linear(h, (b_cat * coef).to(h.dtype)).to(result.dtype)   # (..., d)
    if base_rows is not None:      # peft's mixed batch: "__base__" rows get the base model's output
        out = torch.where(base_rows.reshape(-1, *[1] * (out.dim() - 1)), result, out)
    if fam.capturing and out.requires_grad:
        with torch.autocast(x.device.type, enabled=False):   # the sketch stays fp32 (half-precision bases)
            xr = x.detach().reshape(-1, x.shape[-1]).float() @ fam.sketch_proj.to(x.device)   # (T, p)

        def accumulate(grad: torch.Tensor) -> None:
            with torch.autocast(grad.device.type, enabled=False):   # (d, p) = sum_t delta_t (x_t R)
                fam.sketches[l] += grad.detach().reshape(-1, grad.shape[-1]).float().T @ xr
        out.register_hook(accumulate)
    return out


def _base_rows(adapter_names: Optional[list[str]], x: torch.Tensor) -> Optional[torch.Tensor]:
    """peft's ``adapter_names`` (one name per batch row) as a (batch,) mask of "__base__" rows; None when
    every row is StructLoRA's. Other adapter names are refused (StructLoRA has one adapter)."""
    if adapter_names is None:
        return None
    unknown = sorted(set(adapter_names) - {ADAPTER, "__base__"})
    if unknown:
        raise ValueError(f"adapter_names may name {ADAPTER!r} (StructLoRA) or '__base__' (the base model), got {unknown}")
    if "__base__" not in adapter_names:
        return None
    return torch.tensor([n == "__base__" for n in adapter_names], device=x.device)


def _layer_delta_weight(layer: nn.Module, adapter: str) -> torch.Tensor:
    """The replacement ``get_delta_weight`` of one peft layer: StructLoRA's eval update B_eff A_eff (gates,
    scaling and coordinator folded in, `StructLoraModel.effective_factors`), in the base weight's layout.
    peft's ``merge`` / ``unmerge`` (``merge_adapter``, ``unmerge_adapter``, peft's ``merge_and_unload``)
    call it, so they merge exactly what the eval forward computes."""
    if adapter != ADAPTER:
        return type(layer).get_delta_weight(layer, adapter)
    owner, fam, l = layer._structlora
    b, a = owner._eval_factors(fam, l)
    delta = b @ a                                                            # (d, k)
    return delta.T if getattr(layer, "fan_in_fan_out", False) else delta


def _checkpointing(model: nn.Module) -> bool:
    """Gradient (activation) checkpointing is on in some module (transformers' ``gradient_checkpointing`` flag)."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def get_structlora_model(model: nn.Module, config: StructLoraConfig) -> StructLoraModel:
    """Wrap a transformers/timm model: peft LoRA layers, then StructLoRA gates and coordinator.

    Errors (unknown target modules, r <= 0, bad keep_ratio, similarity graph on one layer, family
    shape mismatch, non-finite parameters) are raised here, before any training.
    """
    if not isinstance(config, StructLoraConfig):
        raise TypeError(f"config must be a StructLoraConfig, got {type(config).__name__}")
    check_supported(model)  # unsupported adapters already in the model (prefix, DoRA, bottleneck, ...) fail by name
    from peft.tuners.tuners_utils import BaseTunerLayer
    if isinstance(model, PeftModel) or any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        raise ValueError("the model already carries a peft adapter: get_structlora_model adds LoRA layers itself; "
                         "to put StructLoRA on an existing peft LoRA / VeRA model use StructLoraModel(peft_model, config)")
    targets = config.target_modules
    if isinstance(targets, (list, set, tuple)):
        names = [n for n, _ in model.named_modules()]
        missing = sorted(t for t in targets if not any(n == t or n.endswith("." + t) for n in names))
        if missing:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                             if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"})
            raise ValueError(f"target_modules {missing} not found in the model; its Linear/Conv1D module names are {linear}")
    return StructLoraModel(get_peft_model(model, config.to_lora_config()), config)
