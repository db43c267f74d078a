"""MBF_SPEC section 3 written out literally: the oracle the bucketed optimizer is tested against.

Dense (d, d) matrices for every block, ``torch.linalg.cholesky_ex`` / ``torch.cholesky_solve``,
momentum as whole-tensor arithmetic, and a Python loop over parameters. It shares only the
parameter -> block mapping (:mod:`.blocks`, tested against MBF_SPEC section 2 on its own) with
:class:`~mbf_kernels.optim.MBF`; none of the compact layout, buckets or kernels. Slow by design.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from .blocks import ModuleRoles, module_roles, plan_group
from .mbf import DEFAULTS, _state_dtype, _validate_group


class ReferenceMBF(torch.optim.Optimizer):
    """The plain-PyTorch MBF: same options and block rules as :class:`MBF`, none of its kernels."""

    def __init__(self, params: Iterable, lr: float = DEFAULTS["lr"], **options) -> None:
        self._roles: ModuleRoles | None = options.pop("_roles", None)
        self._units: list[list] = []
        self._n_params = 0
        self.stats = {"skipped_curvature": 0, "failed_factor": 0}
        defaults = dict(DEFAULTS, lr=lr, **options)
        _validate_group(defaults)
        super().__init__(params, defaults)

    @classmethod
    def from_model(cls, model: nn.Module, lr: float = DEFAULTS["lr"], **options) -> "ReferenceMBF":
        return cls(model.parameters(), lr=lr, _roles=module_roles(model), **options)

    def __getstate__(self) -> dict:  # as MBF.__getstate__
        return {**super().__getstate__(), "_units": self._units, "_n_params": self._n_params,
                "stats": self.stats, "_roles": None}

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _validate_group(group)
        units = plan_group(group["params"], group, self._roles, self._n_params)
        self._units.append(units)
        self._n_params += len(group["params"])
        for unit in units:
            p0 = unit.params[0]
            dt = _state_dtype(p0)
            st = self.state[p0]
            st["step"] = 0
            st["F"] = [None] * len(unit.segments)  # dense (n, d, d) per segment, or (d, d)
            st["L"] = [None] * len(unit.segments)
            for p in unit.params:
                self.state[p]["momentum_buffer"] = torch.zeros(p.shape, dtype=dt, device=p.device)

    def _factor(self, F: Tensor, damping: float) -> Tensor:
        """Cholesky factor of F + damping I; failed blocks: diag(sqrt(F_ii + damping)),
        else sqrt(damping), else 1 (MBF_SPEC section 4)."""
        eye = torch.eye(F.shape[-1], dtype=F.dtype, device=F.device)
        L, info = torch.linalg.cholesky_ex(F + damping * eye)
        failed = info != 0
        self.stats["failed_factor"] += int(failed.sum())
        s = F.diagonal(dim1=-2, dim2=-1) + damping
        fallback = torch.where(torch.isfinite(s) & (s > 0), s.clamp_min(0).sqrt(),
                               torch.full_like(s, damping ** 0.5 if damping > 0 else 1.0))
        return torch.where(failed[..., None, None], torch.diag_embed(fallback), L)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group, units in zip(self.param_groups, self._units):
            lr, rho, beta = group["lr"], group["momentum"], group["beta"]
            wd, damping = group["weight_decay"], group["damping"]
            decoupled = group["decoupled_weight_decay"]
            t1, t2 = group["curvature_update_freq"], group["inverse_update_freq"]
            for unit in units:
                if all(p.grad is None for p in unit.params):
                    continue
                st = self.state[unit.params[0]]
                st["step"] += 1
                k = st["step"]
                dt = _state_dtype(unit.params[0])
                ps = [p.detach().to(dt, copy=True) for p in unit.params]  # pre-step values
                gs = [(p.grad if p.grad is not None else torch.zeros_like(p)).to(dt)
                      for p in unit.params]
                ms = [self.state[p]["momentum_buffer"] for p in unit.params]
                # Steps 3-4: d = g + gamma p (coupled) or g; m = rho m + d.
                for p, g, m in zip(ps, gs, ms):
                    m.mul_(rho).add_(g if decoupled else g + wd * p)
                for s, seg in enumerate(unit.segments):
                    G, M, P = seg.rows(gs), seg.rows(ms), seg.rows(ps)
                    # Step 1: curvature, every T1 steps; blocks with a non-finite g keep F.
                    if (k - 1) % t1 == 0:
                        if unit.kind == "shared":
                            C = G.mT @ G / G.shape[0]
                            finite = torch.isfinite(G).all()
                        else:
                            C = G[:, :, None] * G[:, None, :]
                            finite = torch.isfinite(G).all(dim=1)[:, None, None]
                        F_old = st["F"][s] if st["F"][s] is not None else torch.zeros_like(C)
                        new = C if k == 1 else beta * F_old + (1 - beta) * C
                        st["F"][s] = torch.where(finite, new, F_old)
                        self.stats["skipped_curvature"] += int((~finite).sum())
                    # Step 2: factor, every T2 steps.
                    if (k - 1) % t2 == 0:
                        st["L"][s] = self._factor(st["F"][s], damping)
                    # Step 5: u = (F + lambda I)^{-1} m per block (shared: every row).
                    L = st["L"][s]
                    if unit.kind == "shared":
                        U = torch.cholesky_solve(M.mT, L).mT
                    else:
                        U = torch.cholesky_solve(M[:, :, None], L)[:, :, 0]
                    # Step 6: p = p - alpha u (- alpha gamma p, decoupled), from the pre-step p.
                    new_p = P - lr * U - (lr * wd * P if decoupled else 0)
                    seg.write_rows(unit.params, new_p)
        return loss
