"""MBF's per-group options: one validated dataclass (Distributed Shampoo's pattern), the
defaults derived from it, and the helpers that read a param group.

torch's ``Optimizer`` keeps each param group as a dict (LR schedulers write ``group["lr"]``), so
the optimizer stores dicts; :func:`validate_group` checks one by building :class:`MBFOptions`
from it, whose ``__post_init__`` names the first bad option.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from ..dispatch import CHOICES
from .blocks import CONV1X1, LARGE_LINEAR
from .precision import MATMUL
from .sharding import SHARD

__all__ = ["MBFOptions", "DEFAULTS", "PAPER", "PAPER_LR", "PAPER_DAMPING", "SHARED_BETA", "GRAFT",
           "GRAFT_NORMS", "GRAFT_SECOND_MOMENT", "DAMPING_MODE", "FISHER", "FACTOR_DTYPE",
           "RUN_OPTIONS", "validate_group", "prepare_group", "shared_beta", "momentum_coef",
           "state_dtype", "factor_storage", "graft_lag_warmup", "block_second_moment"]

#: The shared blocks' curvature EMA decay under graft="adam" (option ``shared_beta``), from the
#: defaults sweep's beta axes and paired runs over 8 seeds (bench/RESULTS.md, "A shorter
#: curvature memory for the shared blocks"): a shared block's refresh already averages its
#: layer's rows (rank up to the batch size, where a mini-block's is rank 1), so a shorter memory
#: serves it and tracks the curvature as it moves; the mini-blocks keep beta.
SHARED_BETA = 0.3

#: Values of the options beyond the paper (MBF_SPEC section 3b; definitions in docs/options.md).
GRAFT = ("none", "adam")
#: Which step's per-unit norms scale a grafted step (GroupPlan.lags_graft): this step's (two
#: passes over the buckets) or the previous step's (one pass; docs/options.md).
GRAFT_NORMS = ("current", "previous")
#: How grafting keeps Adam's v for the mini-blocks (docs/options.md): per entry, as Adam, or
#: one per block (the mean of the entries' v, which is all the graft's norm needs); "auto": per
#: block but on CUDA (block_second_moment).
GRAFT_SECOND_MOMENT = ("auto", "element", "block")
DAMPING_MODE = ("absolute", "relative")
FISHER = ("empirical", "true")
#: How a float32 bucket stores its factor (:func:`factor_storage`): "auto" (int8 under relative
#: damping), in the state's dtype, in bfloat16, or as an int8 unit factor (CPU buckets from d = 4
#: on; elsewhere bfloat16).
FACTOR_DTYPE = ("auto", "state", "bfloat16", "int8")


def _real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"MBF: {name} must be a real number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"MBF: {name} must be finite, got {value!r}")
    return v


@dataclass(frozen=True)
class MBFOptions:
    """Every per-group option and its default: MBF as an AdamW drop-in (MBF_SPEC section 3b),
    MBF's direction with Adam's step length per unit, AdamW's betas and eps, damping relative to
    the curvature. lr, damping, T1 and T2 come from the four-task sweep in bench/RESULTS.md
    ("Shipped defaults"), whose rule asks that the lr survive being 9x too large or too small:
    lr is AdamW's own default. :data:`PAPER` selects the paper's exact update (section 3)."""

    lr: float = 1e-3
    momentum: float = 0.9  # heavy ball without grafting; with graft="adam" it is betas[0]
    beta: float = 0.9  # curvature EMA
    # The shared (and low-rank) blocks' curvature EMA; None: SHARED_BETA with graft="adam",
    # beta without (the paper's section 3 has one beta for every block). docs/options.md.
    shared_beta: float | None = None
    damping: float = 0.3  # relative: a fraction of the mean eigenvalue; absolute: added to F
    weight_decay: float = 0.0
    # None: AdamW's decoupled decay with graft="adam", the paper's L2 (coupled) without.
    decoupled_weight_decay: bool | None = None
    curvature_update_freq: int = 10  # T1
    inverse_update_freq: int = 100  # T2
    max_block_size: int = 64
    large_linear: str = "auto"  # "auto" | "shared" | "lowrank" | "chunk" | "diagonal"
    shared_rank: int | None = None  # rank of a "lowrank" block; None: per device (AUTO_RANK)
    # Their applying GEMMs: "auto" (tf32 on CUDA; bfloat16 on a CPU with AVX512_BF16 or AMX under
    # relative damping; precision.resolve) | "float32" | "tf32" | "bfloat16"
    shared_matmul: str = "auto"
    conv1x1: str = "conv"  # "conv" | "row"
    backend: str = "auto"  # "auto" | "cpu" | "cuda" | "triton" | "torch"
    graft: str = "adam"  # "adam" | "none"
    # Whose per-unit norms scale a grafted step: the previous step's (one pass over the
    # buckets) or this step's (exact, two passes); the panel trained alike (bench/RESULTS.md).
    graft_norms: str = "previous"  # "previous" | "current"
    # Adam's v of the mini-blocks per entry or one per block (the shared blocks' rows keep
    # theirs per entry): a ninth of the bytes at d = 9 (docs/options.md); "auto": per block
    # but on CUDA, where no GPU has measured it yet.
    graft_second_moment: str = "auto"  # "auto" | "element" | "block"
    damping_mode: str = "relative"  # "relative" | "absolute"
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    fisher: str = "empirical"  # "empirical" | "true" (MBF-True: sampled labels)
    # A float32 bucket's Cholesky factor in bfloat16 (half the step's largest stream) or as an
    # int8 unit factor (docs/options.md): "auto" int8 under relative damping only (factor_storage).
    factor_dtype: str = "auto"  # "auto" | "state" | "bfloat16" | "int8"
    # Each data-parallel rank keeps and works on a share of the blocks (optim/sharding.py);
    # None: when a process group of more than one rank is initialised.
    shard_curvature: bool | None = None

    def __post_init__(self) -> None:
        """ValueError naming the first bad option (MBF_SPEC section 4)."""
        for name in ("lr", "damping", "weight_decay", "eps"):
            if _real(name, getattr(self, name)) < 0:
                raise ValueError(f"MBF: {name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("momentum", "beta", "shared_beta"):
            if name == "shared_beta" and self.shared_beta is None:
                continue
            if not 0.0 <= _real(name, getattr(self, name)) < 1.0:
                raise ValueError(f"MBF: {name} must be in [0, 1), got {getattr(self, name)!r}")
        for name in ("curvature_update_freq", "inverse_update_freq", "max_block_size",
                     "shared_rank"):
            value = getattr(self, name)
            if name == "shared_rank" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"MBF: {name} must be an integer >= 1, got {value!r}")
        if self.shard_curvature not in SHARD:
            raise ValueError("MBF: shard_curvature must be True, False or None, got "
                             f"{self.shard_curvature!r}")
        if self.decoupled_weight_decay is not None and not isinstance(
                self.decoupled_weight_decay, bool):
            raise ValueError("MBF: decoupled_weight_decay must be True, False or None, got "
                             f"{self.decoupled_weight_decay!r}")
        for name, choices in (("large_linear", LARGE_LINEAR), ("shared_matmul", MATMUL),
                              ("conv1x1", CONV1X1),
                              ("backend", CHOICES), ("graft", GRAFT),
                              ("graft_norms", GRAFT_NORMS),
                              ("graft_second_moment", GRAFT_SECOND_MOMENT),
                              ("damping_mode", DAMPING_MODE), ("fisher", FISHER),
                              ("factor_dtype", FACTOR_DTYPE)):
            if getattr(self, name) not in choices:
                raise ValueError(f"MBF: {name} must be one of {choices}, got "
                                 f"{getattr(self, name)!r}")
        self._check_betas()

    def _check_betas(self) -> None:
        betas = self.betas
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"MBF: betas must be a pair (beta1, beta2), got {betas!r}")
        for name, value in zip(("betas[0]", "betas[1]"), betas):
            if not 0.0 <= _real(name, value) < 1.0:
                raise ValueError(f"MBF: {name} must be in [0, 1), got {value!r}")
        if (self.graft == "adam" and self.momentum != MBFOptions.momentum
                and self.momentum != betas[0]):
            raise ValueError(f"MBF: with graft='adam' the momentum coefficient is betas[0] "
                             f"({betas[0]!r}, as in AdamW); momentum={self.momentum!r} would "
                             "have no effect: pass betas=(momentum, beta2) instead")


#: The defaults of every per-group option, as the dict torch's Optimizer takes.
DEFAULTS: dict = asdict(MBFOptions())

#: The paper's update exactly (MBF_SPEC section 3): ``MBF(params, lr=..., damping=..., **PAPER)``
#: (decoupled_weight_decay then defaults to False, the paper's L2). Its lr and (absolute) damping
#: live in other units than the defaults'; PAPER_LR and PAPER_DAMPING are the earlier sweep's
#: choice on digits (bench/RESULTS.md, "Optimizer defaults (lr, damping)").
PAPER: dict = dict(graft="none", damping_mode="absolute", fisher="empirical")
PAPER_LR, PAPER_DAMPING = 0.01, 0.3

#: Options that shape the optimizer's buffers or describe this run (fixed at construction):
#: kept from the loading optimizer on load_state_dict.
RUN_OPTIONS = ("backend", "max_block_size", "large_linear", "shared_rank", "conv1x1", "graft",
               "damping_mode", "fisher", "shard_curvature", "factor_dtype",
               "graft_second_moment")


#: torch.optim.AdamW's keywords that choose how it runs, or a variant of Adam: a constructor call
#: copied from AdamW keeps working where they ask for nothing MBF lacks, and names the one that
#: does. `foreach` and `fused` are ignored (the MBF step is always fused; `backend` picks its
#: implementation); the others are refused when set, with why.
ADAMW_IMPLEMENTATION = ("foreach", "fused")
ADAMW_VARIANTS = {
    "amsgrad": "grafting takes Adam's step length from v itself, not AMSGrad's running maximum",
    "maximize": "negate the loss instead",
    "capturable": "the step decides its refreshes on the host, so a CUDA graph cannot capture it",
    "differentiable": "the fused step has no autograd formula",
}


def pop_adamw_switches(options: dict) -> None:
    """Take AdamW's keywords out of constructor ``options`` (ADAMW_*): None or a bool for
    `foreach` / `fused`, a false value for the variants; ValueError naming anything else."""
    for name in ADAMW_IMPLEMENTATION:
        value = options.pop(name, None)
        if value is not None and not isinstance(value, bool):
            raise ValueError(f"MBF: {name} must be None or a bool (AdamW's keyword; MBF's step "
                             f"is always fused), got {value!r}")
    for name, why in ADAMW_VARIANTS.items():
        value = options.pop(name, False)
        if value:
            raise ValueError(f"MBF: {name}={value!r} is AdamW's and not supported: {why}")


def validate_group(group: dict) -> None:
    """ValueError naming the first unknown or bad option of a param group."""
    unknown = sorted(set(group) - set(DEFAULTS) - {"params", "name"})
    if unknown:
        raise ValueError(f"MBF: unknown option(s) {unknown}; known options: {sorted(DEFAULTS)}")
    MBFOptions(**{k: group[k] for k in DEFAULTS})


def prepare_group(group: dict) -> None:
    """Validate a param group, then resolve its "auto" options in place (decoupled decay)."""
    validate_group(group)
    if group["decoupled_weight_decay"] is None:
        group["decoupled_weight_decay"] = group["graft"] != "none"


def shared_beta(group: dict) -> float:
    """The shared blocks' curvature EMA decay: ``shared_beta``, or where it is None,
    SHARED_BETA with graft="adam" and the group's ``beta`` without (read at each refresh, so
    that a beta changed later still applies to every block of the paper's update)."""
    if group["shared_beta"] is not None:
        return group["shared_beta"]
    return SHARED_BETA if group["graft"] == "adam" else group["beta"]


def momentum_coef(group: dict) -> float:
    """The heavy-ball coefficient: AdamW's beta1 when grafting from Adam."""
    return group["betas"][0] if group["graft"] == "adam" else group["momentum"]


def graft_lag_warmup(group: dict) -> int:
    """The steps after which ``graft_norms="previous"`` may lag: the momentum's memory,
    ceil(1 / (1 - beta1)) (10 at AdamW's 0.9). A younger unit's m is mostly its last few
    gradients, and consecutive steps' ratios |a| / |u| measured 10-25x apart at step 2 (the
    momentum then leaves the one gradient the first factor was built from) and up to 2x until
    step 10, against at most 1.5x after (bench/RESULTS.md, "A one-pass grafted step")."""
    return math.ceil(1 / (1 - group["betas"][0]))


def factor_storage(group: dict) -> str:
    """How the group's float32 buckets keep their factor (``factor_dtype``): "state", "bfloat16"
    or "int8" (where a bucket's step reads it, else bfloat16: Bucket.factor_dtype). "auto" is
    "int8" under relative damping, whose damping is a fixed fraction of each unit's mean
    curvature eigenvalue and so bounds the blocks' conditioning and how much the factor's
    coding (half a code step of U, half a bfloat16 ulp of the pivots) can move the direction;
    "state" under absolute damping, so that the paper's options give section 3's update
    exactly, whatever the defaults are."""
    option = group["factor_dtype"]
    if option != "auto":
        return option
    return "int8" if group["damping_mode"] == "relative" else "state"


def block_second_moment(group: dict, device: torch.device) -> bool:
    """Whether grafting keeps Adam's v of the group's mini-blocks on ``device`` one per block:
    "auto" does but on CUDA. The CPU's step is bound by its bytes, which this cuts by a ninth
    at d = 9 (the VGG16 steps 8-10% faster, the panel's losses within their seeds' spread:
    bench/RESULTS.md); a GPU's step is bound by its host time, and no GPU has run it yet."""
    option = group["graft_second_moment"]
    return group["graft"] == "adam" and (
        option == "block" or (option == "auto" and device.type != "cuda"))


def state_dtype(p: Tensor) -> torch.dtype:
    # MBF_SPEC section 3: curvature in float32, or float64 for float64 parameters.
    return torch.float64 if p.dtype == torch.float64 else torch.float32
