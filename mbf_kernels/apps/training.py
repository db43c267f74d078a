"""``mbf train``: train one model with MBF and with baseline optimizers on the same data, the
same seeds and the same budget, and report what each reached.

Fairness, as the comparison defines it:
  * every run of a task starts from the same initial weights (the model is built after
    ``torch.manual_seed(seed)``) and sees the same mini-batches in the same order (one seeded
    permutation per epoch, drawn from a generator that only the data order uses);
  * every run gets the same budget: ``epochs`` and, if given, ``budget_s`` seconds of training
    time (evaluation is not counted), whichever ends first;
  * the runs of a seed advance together, an epoch each in turn, so that the times compared
    were taken under the same load (a shared machine's speed drifts over minutes);
  * with ``tune``, every optimizer's learning rate (MBF's included) comes from a sweep of the
    same size around its default, scored on the training loss after ``tune_epochs`` epochs.
Training loss is the mean of the mini-batch losses of each epoch (the loss the optimizer saw);
test loss and accuracy are computed after each epoch in eval mode.
"""

from __future__ import annotations

import importlib.util
import math
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from . import models
from .benchmark import sync
from .data import Dataset
from ..optim import MBF
from ..optim.fisher import sampled_loss
from ..optim.options import DEFAULTS as MBF_DEFAULTS
from ..optim.options import PAPER, PAPER_DAMPING, PAPER_LR

__all__ = ["TrainConfig", "Task", "RunResult", "OPTIMIZERS", "available_optimizers",
           "make_task", "train_run", "tune_lr", "compare"]

# Default learning rates: MBF's and MBF-True's the shipped default and the paper-mode MBF's,
# each from its own sweep (bench/RESULTS.md); SGD and AdamW the usual starting points for CNNs;
# SOAP its library's default.
DEFAULT_LR = {"mbf": MBF_DEFAULTS["lr"], "mbf_true": MBF_DEFAULTS["lr"], "mbf_paper": PAPER_LR,
              "sgd": 0.05, "adamw": 1e-3, "soap": 3e-3, "shampoo": 1e-3}
#: Multipliers of the default learning rate tried by --tune, the same for every optimizer.
TUNE_FACTORS = (1 / 9, 1 / 3, 1.0, 3.0, 9.0)


@dataclass
class TrainConfig:
    """One comparison's settings (every field is a ``mbf train`` flag)."""

    epochs: int = 10
    budget_s: float | None = None
    batch_size: int = 64
    seed: int = 0
    seeds: tuple[int, ...] = ()  # compare() repeats every run over these (default: seed)
    device: str = "cpu"
    compile: bool = False
    amp: str | None = None  # None or "bf16"
    weight_decay: float = 0.0
    lr: dict[str, float] = field(default_factory=dict)  # per optimizer; DEFAULT_LR otherwise
    momentum: float = 0.9  # SGD's and the paper-mode MBF's momentum
    damping: float = MBF_DEFAULTS["damping"]  # MBF's (relative: a fraction of the curvature)
    beta: float = MBF_DEFAULTS["beta"]  # mbf's and mbf_true's curvature EMA decay
    shared_beta: float | None = MBF_DEFAULTS["shared_beta"]  # their shared blocks' (None: auto)
    paper_damping: float = PAPER_DAMPING  # the paper-mode MBF's (absolute)
    curvature_update_freq: int = MBF_DEFAULTS["curvature_update_freq"]
    inverse_update_freq: int = MBF_DEFAULTS["inverse_update_freq"]
    mbf_backend: str = "auto"
    factor_dtype: str = MBF_DEFAULTS["factor_dtype"]  # mbf's and mbf_true's factor storage
    shared_matmul: str = MBF_DEFAULTS["shared_matmul"]  # their shared blocks' GEMM precision
    graft_norms: str = MBF_DEFAULTS["graft_norms"]  # mbf's and mbf_true's graft ratios
    lr_milestones: tuple[int, ...] = ()  # epochs after which lr is multiplied by lr_gamma
    lr_gamma: float = 0.1
    tune: bool = False
    tune_epochs: int = 2

    def lr_of(self, optimizer: str) -> float:
        return self.lr.get(optimizer, DEFAULT_LR[optimizer])


# SGD and AdamW run fused (one kernel for all parameters, on CPU too): the fastest torch has,
# so that time per epoch compares MBF with the strongest first-order step, not the for-loop one
# torch picks by default on CPU (4x slower for AdamW on the autoencoder here).
def _make_sgd(params, lr: float, cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           fused=True)


def _make_adamw(params, lr: float, cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay, fused=True)


def _make_mbf(params, lr: float, cfg: TrainConfig, model: nn.Module,
              fisher: str = "empirical") -> torch.optim.Optimizer:
    # The shipped defaults (an AdamW drop-in: Adam's step lengths, betas, decoupled decay).
    return MBF.from_model(model, lr=lr, damping=cfg.damping, beta=cfg.beta,
                          shared_beta=cfg.shared_beta, weight_decay=cfg.weight_decay,
                          fisher=fisher, curvature_update_freq=cfg.curvature_update_freq,
                          inverse_update_freq=cfg.inverse_update_freq, backend=cfg.mbf_backend,
                          factor_dtype=cfg.factor_dtype, graft_norms=cfg.graft_norms,
                          shared_matmul=cfg.shared_matmul)


def _make_mbf_true(params, lr: float, cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    # mbf with the curvature from sampled labels (train_run adds the sampled backward).
    return _make_mbf(params, lr, cfg, model, fisher="true")


def _make_mbf_paper(params, lr: float, cfg: TrainConfig,
                    model: nn.Module) -> torch.optim.Optimizer:
    return MBF.from_model(model, lr=lr, damping=cfg.paper_damping, **PAPER, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay,
                          curvature_update_freq=cfg.curvature_update_freq,
                          inverse_update_freq=cfg.inverse_update_freq, backend=cfg.mbf_backend)


def _make_soap(params, lr: float, cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    from pytorch_optimizer import SOAP

    return SOAP(params, lr=lr, weight_decay=cfg.weight_decay)


def _make_shampoo(params, lr: float, cfg: TrainConfig,
                  model: nn.Module) -> torch.optim.Optimizer:
    # The paper's Shampoo baseline, as Distributed Shampoo runs it: grafted (RMSProp, the
    # closest to Adam that pytorch-optimizer grafts from; momentum from betas[0], so AdamW's lr
    # carries over), decoupled decay, preconditioners from step 25 and refreshed every 10
    # steps (its default of 1000 would leave short runs on the graft alone).
    from pytorch_optimizer import ScalableShampoo
    from pytorch_optimizer.optimizer.utils.graft import LayerWiseGrafting

    return ScalableShampoo(params, lr=lr, weight_decay=cfg.weight_decay,
                           decoupled_weight_decay=True, graft_type=LayerWiseGrafting.RMSPROP,
                           start_preconditioning_step=25, preconditioning_compute_steps=10)


OPTIMIZERS: dict[str, Callable] = {"mbf": _make_mbf, "mbf_true": _make_mbf_true,
                                   "mbf_paper": _make_mbf_paper, "sgd": _make_sgd,
                                   "adamw": _make_adamw, "soap": _make_soap,
                                   "shampoo": _make_shampoo}
LABELS = {"mbf": "MBF", "mbf_true": "MBF-True", "mbf_paper": "MBF (paper's update)",
          "sgd": "SGD(momentum)", "adamw": "AdamW", "soap": "SOAP", "shampoo": "Shampoo(graft=rmsprop)"}


def available_optimizers() -> dict[str, str]:
    """Name -> '' when usable here, else why not (SOAP comes from pytorch-optimizer)."""
    out = {name: "" for name in OPTIMIZERS}
    if importlib.util.find_spec("pytorch_optimizer") is None:
        for name in ("soap", "shampoo"):
            out[name] = "pytorch-optimizer is not installed (pip install pytorch-optimizer)"
    return out


@dataclass
class Task:
    """A data set, a model built from it, and the loss it is trained on."""

    name: str
    data: Dataset
    model_name: str
    kind: str  # "classify" (cross-entropy) or "autoencode" (a reconstruction loss)

    @property
    def sampled_loss_kind(self) -> str:
        """The loss's predictive distribution (optim.fisher.LOSSES), which MBF-True samples."""
        return AUTOENCODERS[self.model_name][1] if self.kind == "autoencode" else "cross_entropy"

    def build_model(self) -> nn.Module:
        ds = self.data
        if self.model_name in AUTOENCODERS:
            size = ds.in_channels * ds.image_size**2
            return models.DigitsAutoencoder((size, 256, 128, 64, 16),
                                            activation=AUTOENCODERS[self.model_name][0])
        if self.model_name == "small_cnn":
            return models.SmallCNN(ds.num_classes, ds.in_channels)
        return models.MODELS[self.model_name](num_classes=ds.num_classes,
                                              in_channels=ds.in_channels)

    def loss(self, out: Tensor, x: Tensor, y: Tensor) -> Tensor:
        if self.kind == "classify":
            return F.cross_entropy(out.float(), y)
        t = x.flatten(1).float()
        if self.sampled_loss_kind == "mse":
            return F.mse_loss(out.float(), t)
        # Grey-level targets t make the binary cross-entropy's minimum the entropy H(t), not 0;
        # subtracting it (a constant, so the gradient is unchanged) reports the KL divergence,
        # whose floor is 0 and whose ratios between optimizers mean something.
        entropy = -(torch.special.xlogy(t, t) + torch.special.xlogy(1 - t, 1 - t)).mean()
        return F.binary_cross_entropy_with_logits(out.float(), t) - entropy


#: Autoencoders by name: (hidden activation, reconstruction loss). The classic sigmoid one and
#: the MBF paper's recipe (ReLU hidden layers) have a linear code layer and a sigmoid output
#: with binary cross-entropy; the tanh one reconstructs with squared error (a Gaussian output).
AUTOENCODERS = {"autoencoder": (nn.Sigmoid, "bce"), "relu_autoencoder": (nn.ReLU, "bce"),
                "tanh_autoencoder": (nn.Tanh, "mse")}
MODEL_CHOICES = ("small_cnn", *AUTOENCODERS, "resnet32", "vgg11", "vgg16")


def make_task(data: Dataset, model_name: str) -> Task:
    if model_name not in MODEL_CHOICES:
        raise ValueError(f"unknown model {model_name!r}; choose one of {', '.join(MODEL_CHOICES)}")
    if model_name in AUTOENCODERS:
        lo, hi = float(data.x_train.min()), float(data.x_train.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(f"the autoencoder reconstructs pixels in [0, 1]; {data.name} is "
                             f"standardised to [{lo:.2f}, {hi:.2f}]. Use it on the digits "
                             "data set")
        return Task(f"{data.name}/{model_name}", data, model_name, "autoencode")
    if model_name in ("resnet32", "vgg11", "vgg16") and data.image_size != 32:
        raise ValueError(f"{model_name} expects 32x32 images; {data.name} has "
                         f"{data.image_size}x{data.image_size} (use small_cnn or autoencoder)")
    return Task(f"{data.name}/{model_name}", data, model_name, "classify")


@dataclass
class Point:
    epoch: float  # epochs completed (fractional when the time budget ended mid-epoch)
    time_s: float  # training time so far, evaluation excluded
    train_loss: float  # mean mini-batch loss since the previous point
    test_loss: float
    test_acc: float | None  # None for the autoencoder
    lr: float  # the learning rate of the epoch's last step (after the step decay, if any)


@dataclass
class RunResult:
    task: str
    optimizer: str
    lr: float
    points: list[Point]
    diverged: bool = False
    stats: dict = field(default_factory=dict)
    seed: int = 0

    @property
    def final(self) -> Point:
        return self.points[-1]


def _evaluate(task: Task, model: nn.Module, x: Tensor, y: Tensor, batch: int,
              amp: torch.autocast) -> tuple[float, float | None]:
    model.eval()
    total, correct = torch.zeros((), device=x.device), torch.zeros((), device=x.device)
    with torch.no_grad(), amp:
        for i in range(0, len(x), batch):
            xb, yb = x[i:i + batch], y[i:i + batch]
            out = model(xb)
            total += task.loss(out, xb, yb) * len(xb)
            if task.kind == "classify":
                correct += (out.argmax(1) == yb).sum()
    model.train()
    n = max(len(x), 1)
    acc = float(correct) / n if task.kind == "classify" else None
    return float(total) / n, acc


def train_epochs(task: Task, optimizer: str, lr: float, cfg: TrainConfig, *,
                 epochs: int | None = None, budget_s: float | None = None
                 ) -> Generator[Point, None, RunResult]:
    """Train ``task``'s model from the seeded initialisation with one optimizer, yielding each
    epoch's point; the generator returns the run. Everything random in a run draws from its own
    generators (the data order, MBF-True's sampled labels), so that runs advanced in turns
    (:func:`compare`) are the runs :func:`train_run` makes alone."""
    epochs = cfg.epochs if epochs is None else epochs
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = task.build_model().to(device)
    opt = OPTIMIZERS[optimizer](model.parameters(), lr, cfg, model)
    sched = (torch.optim.lr_scheduler.MultiStepLR(opt, list(cfg.lr_milestones), cfg.lr_gamma)
             if cfg.lr_milestones else None)
    # The optimizer is built on the eager module (MBF reads the module types); the compiled
    # wrapper shares its parameters.
    forward = torch.compile(model) if cfg.compile else model
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp == "bf16")
    ds = task.data
    x, y = ds.x_train.to(device), ds.y_train.to(device)
    xt, yt = ds.x_test.to(device), ds.y_test.to(device)
    order = torch.Generator().manual_seed(cfg.seed)
    labels = torch.Generator(device).manual_seed(cfg.seed)
    n_batches = max(math.ceil(len(x) / cfg.batch_size), 1)
    result = RunResult(task.name, optimizer, lr, [], seed=cfg.seed)
    elapsed = 0.0
    for epoch in range(epochs):
        perm = torch.randperm(len(x), generator=order).to(device)
        loss_sum = torch.zeros((), device=device)  # summed on the device: no sync per step
        done = 0
        start = time.perf_counter()
        for idx in perm.split(cfg.batch_size):
            xb, yb = x[idx], y[idx]
            with amp:
                out = forward(xb)
            loss = task.loss(out, xb, yb)
            opt.zero_grad(set_to_none=True)
            if getattr(opt, "wants_fisher", None) is not None and opt.wants_fisher():
                with opt.fisher_pass():  # MBF-True: the curvature's gradient, at sampled labels
                    sampled_loss(out, task.sampled_loss_kind, generator=labels).backward(
                        retain_graph=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach()
            done += 1
            if budget_s is not None and elapsed + time.perf_counter() - start >= budget_s:
                break
        sync(device)
        elapsed += time.perf_counter() - start
        lr_used = opt.param_groups[0]["lr"]
        if sched is not None:
            sched.step()
        train_loss = float(loss_sum) / done
        test_loss, test_acc = _evaluate(task, forward, xt, yt, 512, amp)
        point = Point(epoch + done / n_batches, elapsed, train_loss, test_loss, test_acc, lr_used)
        result.points.append(point)
        yield point
        if not math.isfinite(train_loss):
            result.diverged = True
            break
        if budget_s is not None and elapsed >= budget_s:
            break
    if isinstance(opt, MBF):
        result.stats = opt.stats
    return result


def train_run(task: Task, optimizer: str, lr: float, cfg: TrainConfig, *, epochs: int | None = None,
              budget_s: float | None = None, on_epoch: Callable[[Point], None] | None = None
              ) -> RunResult:
    """Train ``task``'s model from the seeded initialisation with one optimizer."""
    return _in_turns([train_epochs(task, optimizer, lr, cfg, epochs=epochs, budget_s=budget_s)],
                     [on_epoch])[0]


def _in_turns(runs: list[Generator[Point, None, RunResult]],
              on_epoch: list[Callable[[Point], None] | None]) -> list[RunResult]:
    """Advance the runs an epoch each in turn until every one has ended; their results."""
    results: list[RunResult | None] = [None] * len(runs)
    live = list(range(len(runs)))
    while live:
        for i in list(live):
            try:
                point = next(runs[i])
            except StopIteration as end:
                results[i] = end.value
                live.remove(i)
                continue
            if on_epoch[i] is not None:
                on_epoch[i](point)
    return results


def tune_lr(task: Task, optimizer: str, cfg: TrainConfig,
            on_trial: Callable[[float, float], None] | None = None) -> tuple[float, list[dict]]:
    """The learning rate among default x TUNE_FACTORS with the lowest training loss after
    ``cfg.tune_epochs`` epochs (a diverged trial scores +inf); returns it and every trial."""
    base = cfg.lr_of(optimizer)
    trials = []
    for factor in TUNE_FACTORS:
        lr = base * factor
        run = train_run(task, optimizer, lr, cfg, epochs=cfg.tune_epochs)
        score = math.inf if run.diverged else run.final.train_loss
        trials.append({"task": task.name, "optimizer": optimizer, "lr": lr, "train_loss": score})
        if on_trial is not None:
            on_trial(lr, score)
    best = min(trials, key=lambda t: t["train_loss"])
    return best["lr"], trials


def warm_up(task: Task, cfg: TrainConfig, seconds: float = 1.0) -> None:
    """About a second of untimed SGD on a throwaway model of ``task``: a process's first run
    otherwise also pays for oneDNN's kernel creation, the allocator and the thread pool's start
    (on the shapes CNN, identical optimizers measured 1.25x slower per epoch when run first than
    when run second, dev VM), which made whichever optimizer came first look slower."""
    train_run(task, "sgd", cfg.lr_of("sgd"), cfg, epochs=1, budget_s=seconds)


def compare(tasks: list[Task], optimizers: list[str], cfg: TrainConfig, progress=None
            ) -> tuple[list[RunResult], list[dict]]:
    """Every optimizer on every task, for each of ``cfg.seeds`` (initial weights and data order;
    the lr is tuned on the first); ``progress`` is an optional rich.progress.Progress (one bar
    per run, and one per tuning sweep). The runs of a seed advance together, an epoch each in
    turn, so that the epoch times compared were taken seconds apart: a shared VM's speed
    drifts over minutes, and run one after another, the same MBF-against-AdamW comparison read
    1.10x and then 1.48x per epoch on the dev VM (in the second, one MBF run's epochs went from
    50 to 32 ms halfway while AdamW's took 26-28 ms throughout). Each run is still the run it
    would be alone (:func:`train_epochs`)."""
    results, trials = [], []
    seeds = cfg.seeds or (cfg.seed,)
    cfg = replace(cfg, seed=seeds[0])  # the tuning runs' seed
    for task in tasks:
        warm_up(task, cfg)
        lrs = {}
        for name in optimizers:
            lr = cfg.lr_of(name)
            if cfg.tune:
                bar = progress.add_task(f"tune {task.name} {LABELS[name]}", total=len(TUNE_FACTORS),
                                        status="") if progress else None

                def on_trial(trial_lr: float, score: float, bar=bar) -> None:
                    if progress:
                        progress.update(bar, advance=1, status=f"lr {trial_lr:.3g}: {score:.4f}")

                lr, tried = tune_lr(task, name, cfg, on_trial)
                trials += tried
            lrs[name] = lr
        for seed in seeds:
            seed_cfg = replace(cfg, seed=seed)
            label = f" seed {seed}" if len(seeds) > 1 else ""
            bars = [_RunBar(task, name, lrs[name], seed_cfg, progress, label) if progress
                    else None for name in optimizers]
            results += _in_turns([train_epochs(task, name, lrs[name], seed_cfg,
                                               budget_s=cfg.budget_s) for name in optimizers],
                                 bars)
            for bar in filter(None, bars):
                bar.finish()
    return results, trials


class _RunBar:
    """A run's progress bar, moved by each epoch's point: it counts epochs, or seconds when a
    time budget is set."""

    def __init__(self, task: Task, name: str, lr: float, cfg: TrainConfig, progress,
                 label: str) -> None:
        self.progress, self.timed = progress, bool(cfg.budget_s)
        self.total = cfg.budget_s if cfg.budget_s else cfg.epochs
        self.bar = progress.add_task(f"{task.name} {LABELS[name]} lr={lr:.3g}{label}",
                                     total=self.total, status="")

    def __call__(self, p: Point) -> None:
        acc = f" acc {100 * p.test_acc:.1f}%" if p.test_acc is not None else ""
        self.progress.update(self.bar, completed=p.time_s if self.timed else p.epoch,
                             status=f"epoch {p.epoch:.0f} train {p.train_loss:.4f} "
                             f"test {p.test_loss:.4f}{acc}")

    def finish(self) -> None:
        self.progress.update(self.bar, completed=self.total)
