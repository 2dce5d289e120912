"""Divergence: `DivergedError` and the per-step checks that the loss, every trainable gradient and every
trainable parameter are finite (one device synchronisation per check)."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["DivergedError", "check_step_finite", "check_params_finite"]


class DivergedError(FloatingPointError):
    """A non-finite loss, gradient or parameter stopped training.

    ``step`` is the optimizer step (1-based) at which it was found, ``quantity`` one of ``"loss"``,
    ``"gradient"``, ``"parameter"``, ``name`` the parameter's name (None for the loss) and ``history``
    the evaluations before it.
    """

    def __init__(self, step: int, quantity: str, name: str | None, history: list[dict[str, float]] | None = None,
                 value: float | None = None) -> None:
        where = f" of {name!r}" if name else ""
        shown = f" ({value})" if value is not None else ""
        super().__init__(f"diverged at step {step}: non-finite {quantity}{where}{shown}")
        self.step, self.quantity, self.name = step, quantity, name
        self.history = list(history or [])


def _non_finite(t: torch.Tensor) -> bool:
    return not bool(torch.isfinite(t).all())


def check_step_finite(step: int, loss: torch.Tensor, named: list[tuple[str, nn.Parameter]],
                      history: list[dict[str, float]]) -> None:
    """Raise ``DivergedError`` when the step's loss or a trainable gradient is not finite.

    One synchronisation: the flags of all gradients are stacked and read once; the offending
    parameter is looked up only on failure.
    """
    grads = [(n, p.grad) for n, p in named if p.grad is not None]
    flags = torch.stack([torch.isfinite(loss).all().to(loss.device)] +
                        [torch.isfinite(g).all().to(loss.device) for _, g in grads])
    if bool(flags.all()):
        return
    if not bool(flags[0]):
        bad = next((n for n, g in grads if _non_finite(g)), None)
        raise DivergedError(step, "loss", None, history, float(loss)) if bad is None else \
            _diverged_with(step, "loss", float(loss), bad, history)
    name = next(n for (n, g), ok in zip(grads, flags[1:].tolist()) if not ok)
    raise DivergedError(step, "gradient", name, history)


def _diverged_with(step: int, quantity: str, value: float, grad_name: str,
                   history: list[dict[str, float]]) -> DivergedError:
    err = DivergedError(step, quantity, None, history, value)
    err.name = grad_name
    err.args = (f"{err.args[0]}; first non-finite gradient: {grad_name!r}",)
    return err


def check_params_finite(step: int, named: list[tuple[str, nn.Parameter]], history: list[dict[str, float]]) -> None:
    """Raise ``DivergedError`` naming the first trainable parameter that is not finite."""
    flags = torch.stack([torch.isfinite(p.detach()).all().to(named[0][1].device) for _, p in named])
    if bool(flags.all()):
        return
    name = next(n for (n, _), ok in zip(named, flags.tolist()) if not ok)
    raise DivergedError(step, "parameter", name, history)
