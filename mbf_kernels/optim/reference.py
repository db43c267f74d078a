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
from .fisher import FisherCapture
from ..layout import cholesky_from_factor, factor_from_cholesky, unit_coded, unit_factor_fits
from ..reference import relative_damping
from .options import (DEFAULTS, block_second_moment, factor_storage, graft_lag_warmup,
                      momentum_coef, prepare_group, shared_beta, state_dtype, validate_group)


class ReferenceMBF(FisherCapture, torch.optim.Optimizer):
    """The plain-PyTorch MBF: same options and block rules as :class:`MBF`, none of its kernels."""

    def __init__(self, params: Iterable, lr: float = DEFAULTS["lr"], **options) -> None:
        self._roles: ModuleRoles | None = options.pop("_roles", None)
        self._units: list[list] = []
        self._n_params = 0
        self.stats = {"skipped_curvature": 0, "failed_factor": 0}
        self._fisher_grads: dict[Tensor, Tensor] = {}
        defaults = dict(DEFAULTS, lr=lr, **options)
        validate_group(defaults)
        super().__init__(params, defaults)

    @classmethod
    def from_model(cls, model: nn.Module, lr: float = DEFAULTS["lr"], **options) -> "ReferenceMBF":
        return cls(model.parameters(), lr=lr, _roles=module_roles(model), **options)

    def __getstate__(self) -> dict:  # as MBF.__getstate__
        return {**super().__getstate__(), "_units": self._units, "_n_params": self._n_params,
                "stats": self.stats, "_roles": None, "_fisher_grads": {}}

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        prepare_group(group)
        units = plan_group(group["params"], group, self._roles, self._n_params)
        self._units.append(units)
        self._n_params += len(group["params"])
        for unit in units:
            p0 = unit.params[0]
            dt = state_dtype(p0)
            st = self.state[p0]
            st["step"] = 0
            st["F"] = [None] * len(unit.segments)  # dense (n, d, d) per segment, or (d, d)
            st["L"] = [None] * len(unit.segments)
            # graft_second_moment="block": Adam's v one per mini-block, (n,) per segment
            per_block = block_second_moment(group, p0.device) and unit.kind != "shared"
            if per_block:
                st["block_v"] = [torch.zeros(seg.n_blocks, dtype=dt, device=p0.device)
                                 for seg in unit.segments]
            for p in unit.params:
                self.state[p]["momentum_buffer"] = torch.zeros(p.shape, dtype=dt, device=p.device)
                if group["graft"] == "adam" and not per_block:
                    self.state[p]["exp_avg_sq"] = torch.zeros(p.shape, dtype=dt, device=p.device)

    def _factor(self, F: Tensor, damping: float | Tensor) -> Tensor:
        """Cholesky factor of F + damping I; failed blocks: diag(sqrt(F_ii + damping)),
        else sqrt(damping), else 1 (MBF_SPEC section 4)."""
        eye = torch.eye(F.shape[-1], dtype=F.dtype, device=F.device)
        L, info = torch.linalg.cholesky_ex(F + damping * eye)
        failed = info != 0
        self.stats["failed_factor"] += int(failed.sum())
        s = F.diagonal(dim1=-2, dim2=-1) + damping
        floor = (damping ** 0.5 if damping > 0 else 1.0) if not isinstance(damping, Tensor) else (
            torch.where(damping > 0, damping.clamp_min(0).sqrt(), 1.0))
        fallback = torch.where(torch.isfinite(s) & (s > 0), s.clamp_min(0).sqrt(),
                               torch.as_tensor(floor, dtype=s.dtype, device=s.device).expand_as(s))
        return torch.where(failed[..., None, None], torch.diag_embed(fallback), L)

    @staticmethod
    def _stored(group: dict, unit, L: Tensor) -> Tensor:
        """The factor L as a bucket stores it (factor_dtype, float32 blocks that are not
        shared), packed with 1 / L_ii: each entry rounded to bfloat16, or coded as the int8 unit
        factor where a CPU bucket keeps one (Bucket.factor_dtype)."""
        storage = factor_storage(group)
        if storage == "state" or L.dtype != torch.float32 or unit.kind == "shared":
            return L
        packed = factor_from_cholesky(L)
        d = L.shape[-1]
        if storage == "int8" and unit_factor_fits(d, L.device):
            flat = packed.reshape(-1, packed.shape[-1])
            return cholesky_from_factor(unit_coded(flat).reshape(packed.shape))
        return cholesky_from_factor(packed.to(torch.bfloat16).to(L))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        fisher = self._take_fisher_grads()
        for group, units in zip(self.param_groups, self._units):
            stepping = [u for u in units if any(p.grad is not None for p in u.params)]
            # graft_norms="previous": every unit steps at the ratio its previous step measured,
            # unless a unit of the group refactors at this step, is within its first
            # graft_lag_warmup steps or has no ratio yet (then every unit measures its own).
            t2, warmup = group["inverse_update_freq"], graft_lag_warmup(group)
            lagged = (group["graft"] == "adam" and group["graft_norms"] == "previous"
                      and all(self.state[u.params[0]]["step"] % t2 != 0
                              and self.state[u.params[0]]["step"] >= warmup for u in stepping)
                      and all("graft_ratio" in self.state[u.params[0]] for u in stepping))
            for unit in stepping:
                self._step_unit(group, unit, fisher, lagged)
        return loss

    def _refreshes_next(self, group: dict) -> bool:
        units = self._units[next(i for i, g in enumerate(self.param_groups) if g is group)]
        return any(self.state[u.params[0]]["step"] % group["curvature_update_freq"] == 0
                   for u in units)

    def _graft_ratio(self, group: dict, unit, ms: list[Tensor], Us: list[Tensor], k: int):
        """|a| / |u| over the unit (0 where |u| = 0): Adam's direction a = m_hat / (sqrt(v_hat)
        + eps), m_hat = (1 - beta1) m / (1 - beta1^k), v_hat = v / (1 - beta2^k); blocks (rows of
        a shared block) whose |u|^2 or |a|^2 is not finite are left out of both norms."""
        b1, b2 = momentum_coef(group), group["betas"][1]
        block_v = self.state[unit.params[0]].get("block_v")
        vs = None if block_v else [self.state[p]["exp_avg_sq"] for p in unit.params]
        su = sa = 0.0
        for s, (seg, U) in enumerate(zip(unit.segments, Us)):
            m_hat = (1 - b1) * seg.rows(ms) / (1 - b1 ** k)
            v_hat = (block_v[s][:, None] if block_v else seg.rows(vs)) / (1 - b2 ** k)
            A = m_hat / (v_hat.sqrt() + group["eps"])
            u2, a2 = (U * U).sum(1), (A * A).sum(1)
            ok = torch.isfinite(u2) & torch.isfinite(a2)
            su = su + torch.where(ok, u2, 0).sum()
            sa = sa + torch.where(ok, a2, 0).sum()
        return torch.where(su > 0, (sa / su).sqrt(), 0.0) if torch.is_tensor(su) else 0.0

    def _step_unit(self, group: dict, unit, fisher: dict, lagged: bool = False) -> None:
        lr, rho, beta = group["lr"], momentum_coef(group), group["beta"]
        wd, decoupled = group["weight_decay"], group["decoupled_weight_decay"]
        t1, t2 = group["curvature_update_freq"], group["inverse_update_freq"]
        graft = group["graft"] == "adam"
        st = self.state[unit.params[0]]
        st["step"] += 1
        k = st["step"]
        dt = state_dtype(unit.params[0])
        ps = [p.detach().to(dt, copy=True) for p in unit.params]  # pre-step values
        gs = [(p.grad if p.grad is not None else torch.zeros_like(p)).to(dt)
              for p in unit.params]
        ms = [self.state[p]["momentum_buffer"] for p in unit.params]
        # Steps 3-4: d = g + gamma p (coupled) or g; m = rho m + d (and Adam's v, grafting: per
        # entry, or per block the mean of the block's d^2).
        b2 = group["betas"][1]
        block_v = st.get("block_v")
        directions = []
        for p, g, m, param in zip(ps, gs, ms, unit.params):
            direction = g if decoupled else g + wd * p
            directions.append(direction)
            m.mul_(rho).add_(direction)
            if graft and not block_v:
                self.state[param]["exp_avg_sq"].mul_(b2).add_((1 - b2) * direction * direction)
        if graft and block_v:
            for v, seg in zip(block_v, unit.segments):
                v.mul_(b2).add_((1 - b2) * seg.rows(directions).square().mean(1))
        # Step 1: curvature, every T1 steps; blocks with a non-finite g keep F. MBF-True: g is
        # the gradient of the loss at sampled targets (fisher_pass()), not of the data loss.
        if (k - 1) % t1 == 0 and group["fisher"] == "true":
            if not any(p in fisher for p in unit.params):
                raise self._missing_fisher(unit.name)
            gs = [fisher.get(p, torch.zeros_like(p)).to(dt) for p in unit.params]
        for s, seg in enumerate(unit.segments):
            if (k - 1) % t1 == 0:
                G = seg.rows(gs)
                if unit.kind == "shared":
                    C = G.mT @ G / G.shape[0]
                    finite = torch.isfinite(G).all()
                else:
                    C = G[:, :, None] * G[:, None, :]
                    finite = torch.isfinite(G).all(dim=1)[:, None, None]
                F_old = st["F"][s] if st["F"][s] is not None else torch.zeros_like(C)
                decay = shared_beta(group) if unit.kind == "shared" else beta
                new = C if k == 1 else decay * F_old + (1 - decay) * C
                st["F"][s] = torch.where(finite, new, F_old)
                self.stats["skipped_curvature"] += int((~finite).sum())
        # Step 2: factor, every T2 steps. Relative damping (docs/options.md): a fraction of the
        # mean diagonal entry of all the unit's blocks (a shared block counts once).
        if (k - 1) % t2 == 0:
            damping = group["damping"]
            if group["damping_mode"] == "relative":
                Fs = [F if F.ndim == 3 else F[None] for F in st["F"]]
                diag = sum(F.diagonal(dim1=-2, dim2=-1).sum() for F in Fs)
                count = sum(F.shape[0] * F.shape[-1] for F in Fs)
                damping = relative_damping(group["damping"], diag, count)
            for s in range(len(unit.segments)):
                st["L"][s] = self._stored(group, unit, self._factor(st["F"][s], damping))
        # Step 5: u = (F + lambda I)^{-1} m per block (shared: every row).
        Us = []
        for s, seg in enumerate(unit.segments):
            M, L = seg.rows(ms), st["L"][s]
            if unit.kind == "shared":
                Us.append(torch.cholesky_solve(M.mT, L).mT)
            else:
                Us.append(torch.cholesky_solve(M[:, :, None], L)[:, :, 0])
        scale = 1.0
        if graft:  # graft_norms="previous" steps at the ratio measured last
            measured = self._graft_ratio(group, unit, ms, Us, k)
            scale = st["graft_ratio"] if lagged else measured
            st["graft_ratio"] = measured
        # Step 6: p = p - alpha u (- alpha gamma p, decoupled), from the pre-step p.
        for seg, U in zip(unit.segments, Us):
            P = seg.rows(ps)
            seg.write_rows(unit.params, P - lr * scale * U - (lr * wd * P if decoupled else 0))
