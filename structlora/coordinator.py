"""Stage 2: the depth coordinator (Eq. 4-5, 14-15; Theorem 1; appendix E.3-E.6), in function space.

The coordinated update of layer l of a module family is sum_j M_lj dW_j for an (L, L) mixing matrix
M; `model.py` computes it as ONE low-rank product over the neighbours' concatenated factors (rank
(deg+1) r), and `export.py` folds it into the exported adapter. No dense d x k tensor exists.

Two readings of the paper's GCN, chosen by ``mode``:

* ``"smoother"`` (default): the paper's own Laplacian smoothing step (Eq. 14-15, Theorem 1),

      M = I - eta L,   L = D - A  (combinatorial Laplacian of the family's graph),
      eta = eta_max * sigmoid(theta),   eta_max = 1 / lambda_max(L),

  T steps compose (M = prod_t M_t). Rows of M sum to 1, so the depth-constant part of the update
  passes unchanged (a low-pass filter over depth), and for 0 < eta < eta_max M is symmetric positive
  definite, hence invertible: no capacity is lost. It acts from the first step, because
  dL/dB_j = s sum_l M_lj G_l A_j^T mixes the gradients of neighbouring layers even while B = 0, and
  Theorem 1 gives E(MU) <= E(U) - eta (1 - eta lambda_max) ||(L x I) U||^2. ``theta`` starts at
  logit(eta_init) (eta_init: a stated fraction of eta_max) and is learned in its own optimizer group
  (``learn_eta=False`` freezes it: the static-coupling control of E.5). With ``edge_corrections``,
  M_t = I - eta_t L + C_t with C_t symmetric, supported on the edges and zero-initialised: the learned,
  data-aware coupling of E.5.
* ``"gains"``: one zero-initialised scalar gain per edge, M = prod_t (I + S o G_t) with
  S = D^-1/2 (A + I) D^-1/2 (GCN with Theta = theta I, sigma = identity, the linearisation of E.4).
  Training starts exactly as LoRA, but dL/dg_lj = S_lj <G_l, dW_j> is 0 while B = 0, so the gains
  barely move: kept as a named option for the ablation.

Graph per module family (all `query` modules form one chain, all `value` another): 'adjacency' joins
l and l+1; 'similarity' joins layers by the cosine of their batch-summed dL/dW, estimated from a
random-projection sketch G R and smoothed by a moving average across refreshes; 'hybrid' is the
union. Similarity edges are the ``sim_k`` nearest non-adjacent layers of each layer (symmetrised),
or, with ``sim_rule="threshold"``, the pairs whose cosine exceeds a threshold.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

__all__ = [
    "DepthCoordinator", "COORDINATOR_MODES", "SIM_RULES", "chain_adjacency", "normalized_adjacency", "laplacian",
    "knn_edges", "sketch_cosines", "maybe_allreduce",
]

COORDINATOR_MODES = ("smoother", "gains")
SIM_RULES = ("knn", "threshold")


def chain_adjacency(num_layers: int, links: Optional[Sequence[bool]] = None) -> torch.Tensor:
    """(L, L) 0/1 adjacency of the depth chain l -- l+1 (no self-loops); ``links`` (L - 1 flags, default
    all True) drops the edges between members that are not neighbours in the model (`layers.family_links`)."""
    a = torch.zeros(num_layers, num_layers)
    idx = torch.arange(num_layers - 1)
    if links is not None:
        idx = idx[torch.tensor(list(links), dtype=torch.bool)]
    a[idx, idx + 1] = 1.0
    a[idx + 1, idx] = 1.0
    return a


def normalized_adjacency(adj: torch.Tensor) -> torch.Tensor:
    """S = D^-1/2 (A + I) D^-1/2 with self-loops (Eq. 4's 1/sqrt(d_l d_j))."""
    a = adj + torch.eye(adj.shape[0], dtype=adj.dtype, device=adj.device)
    d = a.sum(-1).rsqrt()
    return d[:, None] * a * d[None, :]


def laplacian(adj: torch.Tensor) -> torch.Tensor:
    """Combinatorial graph Laplacian L = D - A (Eq. 6, 13)."""
    return torch.diag(adj.sum(-1)) - adj


def knn_edges(cosine: torch.Tensor, k: int, exclude: torch.Tensor) -> torch.Tensor:
    """(L, L) symmetric 0/1 edges: each layer joined to its ``k`` highest-cosine layers among those
    not in ``exclude`` (its own diagonal and, for the hybrid graph, its chain neighbours)."""
    n = cosine.shape[0]
    banned = exclude.bool() | torch.eye(n, dtype=torch.bool, device=cosine.device)
    score = cosine.masked_fill(banned, float("-inf"))
    k = min(k, n - 1)
    edges = torch.zeros_like(cosine)
    if k <= 0:
        return edges
    top = score.topk(k, dim=-1)
    rows = torch.arange(n, device=cosine.device)[:, None].expand_as(top.indices)
    ok = torch.isfinite(top.values)
    edges[rows[ok], top.indices[ok]] = 1.0
    return ((edges + edges.T) > 0).to(cosine.dtype)


class DepthCoordinator(nn.Module):
    """The mixing matrix M (L, L) of one module family; see the module docstring for the two modes.

    Buffers: ``adjacency`` (the chain, the similarity edges, or their union), ``chain``, and
    ``sim_ema`` (the moving average of the similarity estimates). Parameters: ``theta`` (T,) and, with
    ``edge_corrections``, ``corrections`` (T, L, L) in the smoother mode; ``gains`` (T, L, L) in the
    gains mode.
    """

    def __init__(self, num_layers: int, graph: str, steps: int = 1, mode: str = "gains",
                 eta_init: float = 0.5, learn_eta: bool = True, edge_corrections: bool = False,
                 sim_rule: str = "threshold", sim_k: int = 1, sim_threshold: float = 0.3, sim_ema: float = 0.5,
                 links: Optional[Sequence[bool]] = None) -> None:
        super().__init__()
        if graph in ("similarity", "hybrid") and num_layers < 2:
            raise ValueError(f"graph={graph!r} needs at least 2 layers in a module family, got {num_layers}")
        if mode not in COORDINATOR_MODES:
            raise ValueError(f"mode must be one of {COORDINATOR_MODES}, got {mode!r}")
        if sim_rule not in SIM_RULES:
            raise ValueError(f"sim_rule must be one of {SIM_RULES}, got {sim_rule!r}")
        if not 0.0 < eta_init < 1.0:
            raise ValueError(f"eta_init is a fraction of eta_max in (0, 1), got {eta_init!r}")
        self.graph, self.steps, self.num_layers, self.mode = graph, steps, num_layers, mode
        self.sim_rule, self.sim_k, self.sim_threshold, self.sim_momentum = sim_rule, sim_k, sim_threshold, sim_ema
        chain = chain_adjacency(num_layers, links)
        self.register_buffer("chain", chain)
        self.register_buffer("adjacency", chain.clone() if graph in ("adjacency", "hybrid") else torch.zeros_like(chain))
        self.register_buffer("sim_ema", torch.zeros(num_layers, num_layers))
        self.register_buffer("sim_count", torch.zeros((), dtype=torch.long))
        if mode == "gains":
            self.gains = nn.Parameter(torch.zeros(steps, num_layers, num_layers))
        else:
            theta = torch.full((steps,), math.log(eta_init / (1 - eta_init)))
            if learn_eta:
                self.theta = nn.Parameter(theta)
            else:
                self.register_buffer("theta", theta)
            self.corrections = nn.Parameter(torch.zeros(steps, num_layers, num_layers)) if edge_corrections else None

    # ------------------------------------------------------------------ the mixing matrix
    def laplacian(self) -> torch.Tensor:
        """(L, L) L = D - A of the current graph."""
        return laplacian(self.adjacency)

    def eta_max(self) -> torch.Tensor:
        """1 / lambda_max(L) (0 when the graph has no edge: then M = I whatever eta); a function of the
        adjacency buffer alone, so cached with the neighbour lists (`_graph_cache`)."""
        return self._graph_cache()["eta_max"]

    def _graph_cache(self) -> dict:
        """eta_max and the neighbour lists of the current adjacency, recomputed when it changes (in place, by
        ``set_similarity`` or ``load_state_dict``, or by a move), so a forward pays no eigvalsh or host sync."""
        key = (self.adjacency._version, self.adjacency.data_ptr(), self.adjacency.device, self.adjacency.dtype)
        if getattr(self, "_cache_key", None) != key:
            lam = torch.linalg.eigvalsh(self.laplacian()).max()
            support = self.support()
            self._cache = {"eta_max": torch.where(lam > 1e-9, 1.0 / lam.clamp_min(1e-9), torch.zeros_like(lam)),
                           "nbrs": [support[l].nonzero().flatten().tolist() for l in range(self.num_layers)]}
            self._cache_key = key
        return self._cache

    def eta(self) -> torch.Tensor:
        """(T,) eta_t = eta_max sigmoid(theta_t), strictly < eta_max (smoother mode; theta is clamped to
        +-10 so float32's sigmoid never reaches 1, where M would be singular)."""
        return self.eta_max() * torch.sigmoid(self.theta.clamp(-10.0, 10.0))

    def mixing(self) -> torch.Tensor:
        """(L, L) M: the coordinated dW_l = sum_j M_lj dW_j."""
        eye = torch.eye(self.num_layers, dtype=self.adjacency.dtype, device=self.adjacency.device)
        m = eye
        if self.mode == "gains":
            s = normalized_adjacency(self.adjacency)
            for t in range(self.steps):
                m = (eye + s * self.gains[t]) @ m
            return m
        lap, etas = self.laplacian(), self.eta()
        for t in range(self.steps):
            step = eye - etas[t] * lap
            if self.corrections is not None:
                c = self.corrections[t]
                step = step + 0.5 * (c + c.T) * self.adjacency          # symmetric, on the edges only
            m = step @ m
        return m

    def support(self) -> torch.Tensor:
        """(L, L) bool: which j can contribute to layer l after T steps (T-hop neighbourhood)."""
        a = (self.adjacency + torch.eye(self.num_layers, device=self.adjacency.device)) > 0
        reach = a.clone()
        for _ in range(self.steps - 1):
            reach = (reach.float() @ a.float()) > 0
        return reach

    def neighbours(self) -> list[list[int]]:
        """Per layer l, the j with ``support()[l, j]`` (cached with eta_max, `_graph_cache`)."""
        return self._graph_cache()["nbrs"]

    # ------------------------------------------------------------------ similarity edges
    @torch.no_grad()
    def set_similarity(self, cosine: torch.Tensor, threshold: float | None = None) -> None:
        """Fold an (L, L) cosine estimate into the moving average and rebuild the similarity edges.

        ``threshold`` overrides the configured one for the threshold rule (kept for callers of the
        earlier API).
        """
        cosine = cosine.to(self.sim_ema)
        if int(self.sim_count) == 0:
            self.sim_ema.copy_(cosine)
        else:
            self.sim_ema.mul_(self.sim_momentum).add_((1 - self.sim_momentum) * cosine)
        self.sim_count += 1
        est = self.sim_ema
        if self.sim_rule == "threshold":
            sim = (est > (self.sim_threshold if threshold is None else threshold)).float()
            sim.fill_diagonal_(0.0)
        else:
            exclude = self.chain if self.graph == "hybrid" else torch.zeros_like(self.chain)
            sim = knn_edges(est, self.sim_k, exclude)
        if self.graph == "similarity":
            self.adjacency.copy_(sim)
        elif self.graph == "hybrid":
            self.adjacency.copy_(((self.chain + sim) > 0).float())

    # ------------------------------------------------------------------ evidence
    @torch.no_grad()
    def summary(self) -> dict[str, float]:
        """Per-family evidence: eta (smoother), ||M - I||_F, edges (chain / similarity), finite check."""
        m = self.mixing()
        eye = torch.eye(self.num_layers, dtype=m.dtype, device=m.device)
        sim_edges = ((self.adjacency - self.chain).clamp_min(0).sum() / 2) if self.graph == "hybrid" else (
            self.adjacency.sum() / 2 if self.graph == "similarity" else torch.zeros(()))
        out = {"mix_dev": float((m - eye).norm()), "edges": float(self.adjacency.sum() / 2),
               "similarity_edges": float(sim_edges)}
        if self.mode == "smoother":
            out["eta"] = float(self.eta().mean())
            out["eta_max"] = float(self.eta_max())
        return out

    def parameters_finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self.parameters())


def sketch_cosines(sketches: torch.Tensor) -> torch.Tensor:
    """(L, d, p) gradient sketches G_l R -> (L, L) cosine matrix (0 where a norm is 0)."""
    flat = sketches.flatten(1)
    norms = flat.norm(dim=1)
    gram = flat @ flat.T
    denom = norms[:, None] * norms[None, :]
    return torch.where(denom > 0, gram / denom.clamp_min(1e-30), torch.zeros_like(gram))


def maybe_allreduce(t: torch.Tensor) -> torch.Tensor:
    """Average a tensor over processes when torch.distributed is initialised (keeps edges identical)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
        t /= torch.distributed.get_world_size()
    return t
