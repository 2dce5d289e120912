"""Single-direction removal probe of a trained StructLoRA model (notebook 05).

For every adapted module and every direction j of r, column j of ``lora_B`` is zeroed (so ΔW loses exactly
the rank-one term b_j a_jᵀ), the loss on a fixed validation subset is recomputed, and the column is restored.
The direction's *relevance* is the validation-loss increase. ``correlation_table`` then ranks the directions
by the gate score, the norm ‖b_j‖‖a_j‖ and the effective norm (Spearman ρ with Δloss), with a bootstrap CI
over directions of ρ_gate − ρ_norm (``boot_diff``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from scipy import stats as _st

from structlora.repro.engine import collate

__all__ = ["probe_batches", "val_loss", "probe_layers", "removal_table", "removal_table_model", "spearman",
           "boot_diff", "correlation_table", "kept_table"]


def probe_batches(task: Any, encoded: Mapping[str, Any], loaded: Any, n: int,
                  batch_size: int = 64) -> list[dict[str, torch.Tensor]]:
    """Fixed validation subset of ``n`` examples (permutation seed 0, sorted) as collated batches.

    ``task.kind`` selects the collation; ``loaded.tokenizer.pad_token_id`` (0 when absent) pads.
    """
    ds = encoded["validation"]
    rows = np.sort(np.random.default_rng(0).permutation(len(ds))[: min(n, len(ds))])
    pad = getattr(loaded.tokenizer, "pad_token_id", None) if loaded.tokenizer is not None else None
    pad = 0 if pad is None else int(pad)
    return [collate(task.kind, ds[[int(i) for i in rows[b:b + batch_size]]], pad)
            for b in range(0, len(rows), batch_size)]


@torch.no_grad()
def val_loss(model: torch.nn.Module, batches: Sequence[Mapping[str, torch.Tensor]]) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` (put in eval mode) on ``batches``."""
    model.eval()
    total, correct, n = 0.0, 0, 0
    for b in batches:
        inputs = {k: v for k, v in b.items() if k != "labels"}
        logits = model(**inputs).logits.float()
        total += float(torch.nn.functional.cross_entropy(logits, b["labels"], reduction="sum"))
        correct += int((logits.argmax(-1) == b["labels"]).sum())
        n += len(b["labels"])
    return total / n, correct / n


def probe_layers(n_fam: int, n_layers: int | None) -> list[int]:
    """``n_layers`` evenly spaced layer indices of a family of ``n_fam`` layers (None: every layer)."""
    if n_layers is None or n_layers >= n_fam:
        return list(range(n_fam))
    return sorted({int(round(x)) for x in np.linspace(0, n_fam - 1, n_layers)})


@torch.no_grad()
def removal_table_model(sm: Any, batches: Sequence[Mapping[str, torch.Tensor]], n_layers: int | None = None,
                        label: str = "", progress: bool = True) -> pd.DataFrame:
    """One row per (module, direction) of the StructLoRA model ``sm``: gate score, gate value, norms, and
    Δloss / Δacc (accuracy in points) on ``batches`` when only that direction is removed.

    ``sm`` must have no coordinator (graph=None): with one, a direction also enters its neighbours' updates
    and the removal is not exact. Inactive directions (gate value 0) are not re-evaluated: Δ = 0. The
    frame's ``attrs`` hold ``base_loss``, ``base_acc`` and ``n_examples``.
    """
    from tqdm.auto import tqdm

    if any(fam.coord is not None for fam in sm.families):
        raise ValueError("the removal probe needs graph=None: with a coordinator a direction enters other modules too")
    sm.eval()
    base_loss, base_acc = val_loss(sm, batches)
    rows = []
    bar = tqdm(desc=f"removal probe {label}".strip(), unit="dir", leave=False, disable=not progress,
               total=sum(len(probe_layers(len(fam.names), n_layers)) * fam.A(0).shape[0] for fam in sm.families))
    for fam in sm.families:
        sm.reset_states()
        st = sm.family_state(fam)
        m = st["m"] if st["m"] is not None else torch.ones(len(fam.layers), fam.A(0).shape[0])
        m = m.detach().clone()
        scores = fam.gate.scores()
        s = st["s"]
        sm.reset_states()
        for l in probe_layers(len(fam.names), n_layers):
            name = fam.names[l]
            A, B = fam.A(l), fam.B(l)
            norms = (B.norm(dim=0) * A.norm(dim=1)).detach()
            for j in range(A.shape[0]):
                if m[l, j] == 0:  # an inactive direction (closed gate / masked): removing it changes nothing
                    loss, acc = base_loss, base_acc
                else:
                    saved = B[:, j].clone()
                    B[:, j] = 0.0
                    try:
                        loss, acc = val_loss(sm, batches)
                    finally:
                        B[:, j] = saved
                rows.append({"family": fam.key.split(".")[-1], "layer": l, "module": name, "direction": j,
                             "gate_score": float(scores[l, j]) if scores is not None else np.nan,
                             "gate_value": float(m[l, j]), "active": bool(m[l, j] != 0),
                             "norm": float(norms[j]), "effective_norm": float(s[l] * m[l, j] * norms[j]),
                             "dloss": loss - base_loss, "dacc": 100 * (acc - base_acc)})
                bar.update()
    bar.close()
    out = pd.DataFrame(rows)
    out.attrs.update(base_loss=base_loss, base_acc=base_acc, n_examples=sum(len(b["labels"]) for b in batches))
    return out


@torch.no_grad()
def removal_table(trained: Any, n_examples: int, n_layers: int | None = None, label: str = "") -> pd.DataFrame:
    """``removal_table_model`` of a ``grid.train_spec`` result (``handle.model``, ``task``, ``encoded``,
    ``loaded``) on ``probe_batches`` of ``n_examples`` validation examples; classification tasks only."""
    sm = trained.handle.model
    if trained.task.kind not in ("seq-cls", "image-cls"):
        raise ValueError(f"the removal probe needs a classification task, got {trained.task.kind!r}")
    if any(fam.coord is not None for fam in sm.families):
        raise ValueError("the removal probe needs graph=None: with a coordinator a direction enters other modules too")
    batches = probe_batches(trained.task, trained.encoded, trained.loaded, n_examples)
    return removal_table_model(sm, batches, n_layers, label=label)


def kept_table(path: str | Path, compute: Callable[[], pd.DataFrame], *, reuse: bool) -> pd.DataFrame:
    """An analysis of a trained model computed once and kept beside its run record (``path``: JSON of
    the rows and ``attrs``): read back when ``reuse`` and the file exists, so re-executing a notebook
    from the records recomputes nothing (the removal probe costs minutes), else computed and written."""
    from .._io import atomic_write_json

    path = Path(path)
    if reuse and path.is_file():
        data = json.loads(path.read_text())
        out = pd.DataFrame(data["rows"], columns=data["columns"])
        out.attrs.update(data["attrs"])
        return out
    out = compute()
    atomic_write_json(path, {"columns": list(out.columns), "rows": out.to_dict("records"), "attrs": dict(out.attrs)})
    return out


def spearman(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Spearman's ρ and its p-value; (NaN, NaN) for fewer than 3 values or a constant input."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 3 or np.all(x == x[0]) or np.all(y == y[0]):
        return float("nan"), float("nan")
    r = _st.spearmanr(x, y)
    return float(r.statistic), float(r.pvalue)


def boot_diff(d: pd.DataFrame, a: str, b: str, n_boot: int, seed: int = 0) -> tuple[float, float, float]:
    """95% percentile bootstrap CI of spearman(a, dloss) − spearman(b, dloss) over the rows (directions) of
    ``d``, and the two-sided bootstrap p-value (twice the smaller share of resampled differences on either
    side of 0). All NaN when fewer than max(20, n_boot // 10) resamples give two finite ρ."""
    rng = np.random.default_rng(seed)
    xa, xb, y = d[a].to_numpy(float), d[b].to_numpy(float), d["dloss"].to_numpy(float)
    diffs = []
    for _ in range(n_boot):
        i = rng.integers(0, len(y), len(y))
        ra, rb = spearman(xa[i], y[i])[0], spearman(xb[i], y[i])[0]
        if np.isfinite(ra) and np.isfinite(rb):
            diffs.append(ra - rb)
    if len(diffs) < max(20, n_boot // 10):
        return float("nan"), float("nan"), float("nan")
    diffs = np.asarray(diffs)
    p = min(1.0, 2 * min(np.mean(diffs <= 0), np.mean(diffs >= 0)))
    return float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5)), float(p)


def correlation_table(removal: Mapping[str, pd.DataFrame], n_boot: int,
                      scores: Sequence[str] = ("gate_score", "norm", "effective_norm")) -> pd.DataFrame:
    """One row per (model, directions ∈ {active, all}) of the removal tables in ``removal``: n, Spearman ρ
    and p of each score with ``dloss``, ``rho_gate-rho_norm`` and its bootstrap ``ci_low``, ``ci_high``,
    ``p_boot`` (``boot_diff`` with ``n_boot`` resamples; NaN for fewer than 3 directions)."""
    corr_rows = []
    for m, r in removal.items():
        for subset, d in (("active", r[r["active"]]), ("all", r)):
            row: dict[str, Any] = {"model": m, "directions": subset, "n": len(d)}
            for score in scores:
                rho, p = spearman(d[score], d["dloss"])
                row[f"rho_{score}"], row[f"p_{score}"] = rho, p
            row["rho_gate-rho_norm"] = row["rho_gate_score"] - row["rho_norm"]
            row["ci_low"], row["ci_high"], row["p_boot"] = (boot_diff(d, "gate_score", "norm", n_boot) if len(d) >= 3
                                                            else (np.nan, np.nan, np.nan))
            corr_rows.append(row)
    cols = (["model", "directions", "n"] + [f"{k}_{s}" for s in scores for k in ("rho", "p")]
            + ["rho_gate-rho_norm", "ci_low", "ci_high", "p_boot"])
    return pd.DataFrame(corr_rows, columns=cols)
