"""MBF-True (the paper's Algorithm 4, MBF_SPEC section 3b ``fisher="true"``): the curvature from
the gradient at labels sampled from the model's own predictive distribution.

The optimizer stays an ordinary ``torch.optim`` optimizer. On a step that refreshes the
curvature (``opt.wants_fisher()``), the training loop runs one more backward pass inside
``opt.fisher_pass()``: the gradients it produces go to the curvature only, and the data
gradient accumulated outside it drives the momentum and the update as always::

    out = model(x)
    if opt.wants_fisher():
        with opt.fisher_pass():
            sampled_loss(out, "cross_entropy").backward(retain_graph=True)
    F.cross_entropy(out, y).backward()
    opt.step()

The sampled loss is the training loss itself at sampled targets, with the same (mean)
reduction, so the true Fisher is on the empirical Fisher's scale and one damping serves both.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = ["LOSSES", "sampled_targets", "sampled_loss"]

#: The losses whose predictive distribution is sampled: softmax cross-entropy (categorical),
#: binary cross-entropy on logits (Bernoulli), and squared error (Gaussian).
LOSSES = ("cross_entropy", "bce", "mse")


def sampled_targets(output: Tensor, loss: str, *, generator: torch.Generator | None = None
                    ) -> Tensor:
    """Targets drawn from the model's predictive distribution (no gradient).

    ``"cross_entropy"``: output (N, C) logits -> class indices ~ softmax(output).
    ``"bce"``: logits of any shape -> 0/1 targets ~ Bernoulli(sigmoid(output)).
    ``"mse"``: predictions of any shape -> output + N(0, 1/2) noise: ``F.mse_loss`` is the
    negative log-likelihood of a Gaussian of variance 1/2 up to a constant, so that is the
    distribution its minimiser models.
    """
    out = _full_precision(output.detach())
    if loss == "cross_entropy":
        if out.ndim != 2:
            raise ValueError(f"sampled_targets: cross_entropy needs (N, C) logits, got shape "
                             f"{tuple(out.shape)}")
        return torch.multinomial(out.softmax(1), 1, generator=generator)[:, 0]
    if loss == "bce":
        return torch.bernoulli(torch.sigmoid(out), generator=generator)
    if loss == "mse":
        noise = torch.randn(out.shape, generator=generator, dtype=out.dtype, device=out.device)
        return out + noise * 0.5 ** 0.5
    raise ValueError(f"sampled_targets: loss must be one of {LOSSES}, got {loss!r}")


def sampled_loss(output: Tensor, loss: str, *, generator: torch.Generator | None = None
                 ) -> Tensor:
    """The training loss at :func:`sampled_targets` (mean reduction): its gradient is MBF-True's
    curvature gradient. ``output`` keeps its graph; the targets do not."""
    t = sampled_targets(output, loss, generator=generator)
    out = _full_precision(output)
    if loss == "cross_entropy":
        return F.cross_entropy(out, t)
    if loss == "bce":
        return F.binary_cross_entropy_with_logits(out, t)
    return F.mse_loss(out, t)


def _full_precision(x: Tensor) -> Tensor:
    """float32 for half-precision outputs (autocast), float64 kept."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


class FisherCapture:
    """The ``fisher_pass()`` / ``wants_fisher()`` half of an optimizer with ``fisher="true"``
    (mixed into :class:`~mbf_kernels.optim.MBF` and :class:`~mbf_kernels.optim.ReferenceMBF`).
    Subclasses provide ``_refreshes_next(group) -> bool``."""

    _fisher_grads: dict

    def wants_fisher(self) -> bool:
        """Whether the next ``step()`` refreshes a curvature that ``fisher="true"`` takes from a
        :meth:`fisher_pass` (so the loop can skip the extra backward on the other steps)."""
        return any(g["fisher"] == "true" and self._refreshes_next(g) for g in self.param_groups)

    @contextlib.contextmanager
    def fisher_pass(self) -> Iterator[None]:
        """Gradients accumulated inside go to the curvature of the next ``step()`` only; the
        parameters' ``.grad`` are as they were before, afterwards."""
        params = [p for g in self.param_groups for p in g["params"]]
        saved = [p.grad for p in params]
        for p in params:
            p.grad = None
        try:
            yield
        finally:
            for p, g in zip(params, saved):
                if p.grad is not None:
                    self._fisher_grads[p] = p.grad
                p.grad = g

    def _take_fisher_grads(self) -> dict:
        grads, self._fisher_grads = self._fisher_grads, {}
        return grads

    @staticmethod
    def _missing_fisher(name: str) -> RuntimeError:
        return RuntimeError(
            f"MBF(fisher='true'): this step refreshes the curvature of {name}, but no "
            "gradient for it was captured: when opt.wants_fisher() is True, run "
            "`with opt.fisher_pass(): mbf_kernels.optim.sampled_loss(out, ...).backward("
            "retain_graph=True)` before step()")
