"""Stage 2: the depth coordinator (Eq. 4-5, 7; appendix E.3-E.6), in function space.

The paper's node feature is vec(dW_l) with a learned map W_o back to parameter space (Eq. 5). That is
d*k numbers per node and a (d*k)^2 map, which cannot scale. We restrict Theta^(t) in Eq. (4) to a
scalar gain per edge (GCN with Theta = theta*I) and sigma to the identity (the linearisation used in
E.4), so one residual step is

    dW_l <- dW_l + sum_{j in N(l) u {l}} S_lj g_lj dW_j,     S = D^-1/2 (A + I) D^-1/2.

T steps compose to a mixing matrix M = prod_t (I + S o G_t) (L x L), and the coordinated update of
layer l is sum_j M_lj dW_j: a LoRA of rank (deg+1) r on layer l's input, computed as ONE low-rank
product over concatenated factors (see `model.py`). Gains start at zero, so training starts exactly
as LoRA; no dense d x k tensor or (d*k)-sized parameter is ever created.

Graph per module family (all `query` modules form one chain, all `value` another): 'adjacency' joins
l and l+1; 'similarity' joins layers whose batch-averaged dL/dW have cosine above a threshold,
estimated from a random-projection sketch G R (d x p) refreshed every K steps; 'hybrid' is the union.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["DepthCoordinator", "chain_adjacency", "normalized_adjacency", "laplacian", "sketch_cosines", "maybe_allreduce"]


def chain_adjacency(num_layers: int) -> torch.Tensor:
    """(L, L) 0/1 adjacency of the depth chain l -- l+1 (no self-loops)."""
    a = torch.zeros(num_layers, num_layers)
    idx = torch.arange(num_layers - 1)
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


class DepthCoordinator(nn.Module):
    """Scalar-gain GCN over the L layers of one module family.

    ``gains`` is (T, L, L), zero-initialised; only entries on edges or the diagonal matter.
    ``adjacency`` (L, L) is a buffer: the chain, the similarity edges, or their union.
    """

    def __init__(self, num_layers: int, graph: str, steps: int = 1) -> None:
        super().__init__()
        if graph in ("similarity", "hybrid") and num_layers < 2:
            raise ValueError(f"graph={graph!r} needs at least 2 layers in a module family, got {num_layers}")
        self.graph, self.steps, self.num_layers = graph, steps, num_layers
        self.gains = nn.Parameter(torch.zeros(steps, num_layers, num_layers))
        chain = chain_adjacency(num_layers)
        self.register_buffer("chain", chain)
        self.register_buffer("adjacency", chain.clone() if graph in ("adjacency", "hybrid") else torch.zeros_like(chain))

    def mixing(self) -> torch.Tensor:
        """(L, L) M = prod_t (I + S o G_t): coordinated dW_l = sum_j M_lj dW_j."""
        s = normalized_adjacency(self.adjacency)  # (L, L)
        eye = torch.eye(self.num_layers, dtype=s.dtype, device=s.device)
        m = eye
        for t in range(self.steps):
            m = (eye + s * self.gains[t]) @ m
        return m

    def support(self) -> torch.Tensor:
        """(L, L) bool: which j can contribute to layer l after T steps (T-hop neighbourhood)."""
        a = (self.adjacency + torch.eye(self.num_layers, device=self.adjacency.device)) > 0
        reach = a.clone()
        for _ in range(self.steps - 1):
            reach = (reach.float() @ a.float()) > 0
        return reach

    def neighbours(self) -> list[list[int]]:
        """Per layer l, the j with ``support()[l, j]``; cached until the adjacency changes (in place, by
        ``set_similarity`` or ``load_state_dict``, or by a move), so a forward pays no host sync for it."""
        key = (self.adjacency._version, self.adjacency.data_ptr(), self.adjacency.device)
        if getattr(self, "_nbrs_key", None) != key:
            support = self.support()
            self._nbrs = [support[l].nonzero().flatten().tolist() for l in range(self.num_layers)]
            self._nbrs_key = key
        return self._nbrs

    @torch.no_grad()
    def set_similarity(self, cosine: torch.Tensor, threshold: float) -> None:
        """Rebuild the edges from an (L, L) cosine matrix of gradient sketches."""
        sim = (cosine > threshold).float()
        sim.fill_diagonal_(0.0)
        if self.graph == "similarity":
            self.adjacency.copy_(sim)
        elif self.graph == "hybrid":
            self.adjacency.copy_(((self.chain + sim) > 0).float())


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

