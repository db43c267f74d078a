"""The ops as torch sees them, and which backend serves a call: every registered
``torch.ops.mbf_kernels.*`` op of every compiled backend passes ``torch.library.opcheck``
(schema, fake kernel, autograd registration) on the sample inputs that the correctness tests
use (samples.py), and ``torch.compile`` traces it without a graph break; Triton's real compiler
(ptxas included) builds every kernel for sm_90 and sm_80 with no GPU; backend discovery,
automatic selection and the pure-Python fallback."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import mbf_kernels as mk
import samples
from conftest import DTYPES, randn, random_spd, targets
from mbf_kernels import compact, dispatch, reference
from mbf_kernels.limits import TRITON_MAX_D as MAX_D
from mbf_kernels.packed import pack_tril

#: The op name prefix of each backend's registration (csrc/registration.cpp: none; Triton's
#: triton_op / custom_op registrations: ``triton_``).
PREFIX = {"cpu": "", "cuda": "", "triton": "triton_"}


def _op(target, name):
    return getattr(torch.ops.mbf_kernels, PREFIX[target.backend] + name).default


def _mutable_copy(name, args):
    """In-place ops get a fresh copy of the tensor they update."""
    return (args[0].clone(), *args[1:]) if name.endswith("_") else args


@pytest.mark.parametrize("target", targets())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d", samples.OPCHECK_CASES)
def test_linalg_ops_pass_opcheck(target, n, d, dtype):
    for name, make in samples.LINALG.items():
        torch.library.opcheck(_op(target, name),
                              _mutable_copy(name, make(n, d, dtype, target.device)))


@pytest.mark.parametrize("target", targets())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d", samples.COMPACT_OPCHECK_CASES)
def test_compact_ops_pass_opcheck(target, n, d, dtype):
    for name, make in samples.COMPACT.items():
        torch.library.opcheck(_op(target, name),
                              _mutable_copy(name, make(n, d, dtype, target.device)))
    if target.backend != "triton":  # the single-bucket step op (Triton's is a Python wrapper)
        torch.library.opcheck(_op(target, "mbf_step_"), samples.mbf_step_(n, d, dtype,
                                                                           target.device))


@pytest.mark.parametrize("target", targets())
def test_bucket_step_passes_opcheck(target):
    params, grads, momenta, tiles, segments = samples.bucket_step(torch.float64, target.device)
    F = torch.zeros(tiles, 45, 16, dtype=torch.float64, device=target.device)
    stats = torch.zeros(2, dtype=torch.int64, device=target.device)
    torch.library.opcheck(_op(target, "bucket_step_" if target.backend == "triton"
                              else "mbf_bucket_step_"),
                          (params, grads, momenta, F, F.clone(), stats, segments, 0.1, 0.9,
                           0.8, 0.05, 0.0, False, [], None, None, None, None, 0.999, 1e-8, 1))


def _compile_backend(target) -> str:
    # aot_eager: Dynamo and AOTAutograd trace through the ops (functionalizing their mutations,
    # running the fake kernels) and run the kernels as traced; Inductor's code generation for
    # the Triton ops needs a GPU.
    return "inductor" if target.device == "cuda" else "aot_eager"


@pytest.mark.parametrize("target", targets())
def test_torch_compile_traces_the_ops_without_graph_breaks(target):
    backend = target.backend
    A, G = target.to(random_spd(8, d=9, dtype=torch.float32), randn(8, 9, dtype=torch.float32))
    Fc = compact.to_compact(pack_tril(A))

    def f(A, G, Fc):
        L, info = mk.linalg.cholesky_ex(A, 0.1, backend=backend)
        F = mk.linalg.outer_ema_(A.clone(), G, 0.9, backend=backend)
        # (linalg.solve_spd inspects info to raise, a data-dependent branch: the op does not)
        X, _ = _op(target, "solve_spd_ex")(A, G[:, :, None], 0.1)
        Fc = compact.outer_ema_(Fc.clone(), G, 0.9, backend=backend)
        factor, _ = compact.cholesky_ex(Fc, 8, 0.1, backend=backend)
        return L * 2, info, F, X, compact.solve(factor, G, backend=backend)

    compiled = torch.compile(f, backend=_compile_backend(target), fullgraph=True)
    for got, want in zip(compiled(A, G, Fc), f(A, G, Fc)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("target", targets())
def test_torch_compile_traces_the_bucket_step(target):
    step = dispatch.module(target.backend).mbf_bucket_step_

    def f(params, grads, momenta, F, L, stats, segments):
        step(params, grads, momenta, F, L, stats, segments, lr=0.1, momentum_coef=0.9, beta=0.8,
             damping=0.05, weight_decay=0.0, decoupled_weight_decay=False)
        return params[0] * 1

    out = []
    for fn in (f, torch.compile(f, backend="aot_eager", fullgraph=True)):
        params, grads, momenta, tiles, segments = samples.bucket_step(torch.float64,
                                                                      target.device)
        F = torch.zeros(tiles, 45, 16, dtype=torch.float64, device=target.device)
        stats = torch.zeros(2, dtype=torch.int64, device=target.device)
        out.append((fn(params, grads, momenta, F, F.clone(), stats, segments), params, F))
    torch.testing.assert_close(out[1][0], out[0][0])
    for a, b in zip(out[1][1], out[0][1]):  # the mutations reached the real tensors
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(out[1][2], out[0][2])


@pytest.mark.skipif(not mk._extension.AVAILABLE,
                    reason=f"C++ kernels not built: {mk._extension.LOAD_ERROR}")
def test_direct_op_call_checks_shapes():
    with pytest.raises(RuntimeError, match=r"A must have shape \(N, d, d\)"):
        torch.ops.mbf_kernels.cholesky_ex(torch.zeros(3, 4), 0.0)
    with pytest.raises(RuntimeError, match="B must have shape"):
        torch.ops.mbf_kernels.solve_spd_ex(torch.eye(3).expand(2, 3, 3).contiguous(),
                                           torch.zeros(2, 4, 1), 0.0)


@pytest.mark.skipif(not mk._extension.AVAILABLE,
                    reason=f"C++ kernels not built: {mk._extension.LOAD_ERROR}")
def test_step_op_names_the_mismatched_argument():
    n, d = 5, 3
    p = torch.zeros(n, d)
    C = torch.zeros(1, 6, 16)
    with pytest.raises(RuntimeError, match="momentum must have dtype Float"):
        torch.ops.mbf_kernels.mbf_step_(p, p.clone(), p.double(), C, C.clone(),
                                        torch.zeros(2, dtype=torch.int64), 0.1, 0.9, 0.9, 0.1,
                                        0.0, False, True, True, True)


# ---------------------------------------------------------------------------------------------
# Triton's real compiler: the interpreter never meets it


def _has_nvidia_backend() -> bool:
    return importlib.util.find_spec("triton.backends.nvidia") is not None


_STEP_VARIANTS = {"_bucket_refactor_kernel": ("refresh + refactor",),
                  "_bucket_step_kernel": ("cached factor", "first refresh", "refresh, decoupled")}
COMPILE_CASES = (
    [f"{name}:9:fp32:90:{variant}"
     for name in ("_dense_cholesky_kernel", "_dense_cholesky_solve_kernel",
                  "_dense_solve_spd_kernel", "_dense_inv_spd_kernel", "_dense_outer_ema_kernel",
                  "_compact_outer_ema_kernel", "_compact_cholesky_kernel",
                  "_compact_solve_kernel", "_bucket_refactor_kernel", "_bucket_step_kernel")
     for variant in _STEP_VARIANTS.get(name, ("",))]
    + ["_bucket_step_kernel:1:fp32:90:cached factor",
       f"_bucket_step_kernel:{MAX_D}:fp32:90:first refresh",
       f"_bucket_refactor_kernel:{MAX_D}:fp32:90:refresh + refactor",
       "_bucket_step_kernel:9:fp64:90:cached factor",
       "_bucket_step_kernel:9:fp32:80:first refresh",
       "_bucket_refactor_kernel:9:fp32:80:refactor only",
       "_bucket_step_kernel:9:fp32:90:graft measure",
       "_bucket_step_kernel:9:fp32:90:graft write",
       "_bucket_refactor_kernel:9:fp32:90:relative damping",
       "_bucket_step_kernel:9:fp32:90:graft measure, bf16 factor",
       "_bucket_step_kernel:9:fp32:90:graft lagged, bf16 factor",
       "_bucket_step_kernel:9:fp32:90:graft lagged, bf16 factor, v per block",
       "_bucket_refactor_kernel:9:fp32:90:relative damping, bf16 factor",
       "_dense_solve_spd_kernel:2:fp64:80:"]
)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Every case through Triton's real compiler (TTIR -> TTGIR -> LLVM -> PTX -> cubin, with the
    ptxas Triton ships: no GPU needed), in a process without TRITON_INTERPRET."""
    out = tmp_path_factory.mktemp("compile") / "results.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = [sys.executable, "-m", "mbf_kernels.triton.compile_check", "--json", str(out)]
    for case in COMPILE_CASES:
        args += ["--case", case]
    proc = subprocess.run(args, env=env, capture_output=True, text=True)
    assert out.exists(), proc.stderr[-3000:]
    return {f"{r['name']}:{r['d']}:{r['dtype']}:{r['arch']}:{r['variant']}": r
            for r in json.loads(out.read_text())}


@pytest.mark.skipif(not _has_nvidia_backend(), reason="Triton's NVIDIA backend is not installed")
@pytest.mark.parametrize("case", COMPILE_CASES)
def test_kernel_compiles_to_cubin(compiled, case):
    result = compiled[case]
    assert "error" not in result, result.get("error")
    assert 0 < result["registers"] <= 255


# ---------------------------------------------------------------------------------------------
# Which backend serves a call


def test_backends_report_every_backend_with_a_reason():
    status = mk.backends()
    assert set(status) == {"torch", "cpu", "cuda", "triton"}
    assert status["torch"].available
    for s in status.values():
        assert isinstance(s, mk.BackendStatus) and s.detail
    if not torch.cuda.is_available():
        assert not status["cuda"].available


def test_auto_selection():
    cpu = torch.device("cpu")
    chosen = dispatch.select("auto", cpu, differentiable=False, fn="t")
    expected = mk._extension if mk.backends()["cpu"].available else reference
    assert chosen is expected
    # Autograd must flow, so auto takes the differentiable reference.
    assert dispatch.select("auto", cpu, differentiable=True, fn="t") is reference
    # A device no compiled backend serves still works through the reference.
    assert dispatch.select("auto", torch.device("meta"), differentiable=False, fn="t") is reference


@pytest.mark.skipif(not mk.backends()["cpu"].available, reason="C++ kernels not built")
def test_cpu_backend_refuses_other_devices():
    with pytest.raises(ValueError, match="backend 'cpu' cannot run on meta tensors"):
        dispatch.select("cpu", torch.device("meta"), differentiable=False, fn="t")


@pytest.mark.parametrize("version, available", [("3.6.0", False), ("3.7.1+git5", False),
                                                 ("3.8.0", True), ("4.0", True)])
def test_triton_interpreter_needs_a_version_that_runs_the_kernels(monkeypatch, version, available):
    """Triton 3.6 and 3.7's interpreter fail the kernels' tests (their autotuner asks for a GPU
    driver even for one config): the interpreter backend is unavailable there, and says why."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(dispatch.importlib.metadata, "version", lambda name: version)
    status = dispatch._triton_status()
    assert status.available is available
    if not available:
        assert f"triton {version}'s CPU interpreter" in status.detail and ">= 3.8" in status.detail


def test_auto_never_picks_the_interpreter():
    if not mk.backends()["triton"].available:
        pytest.skip(mk.backends()["triton"].detail)
    cpu = torch.device("cpu")
    chosen = dispatch.select("auto", cpu, differentiable=False, fn="t", d=9)
    assert chosen is not dispatch.module("triton")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_picks_per_block_size():
    dev = torch.device("cuda")
    status = mk.backends()
    small = dispatch.select("auto", dev, differentiable=False, fn="t", d=9, step=True)
    large = dispatch.select("auto", dev, differentiable=False, fn="t", d=33, step=True)
    huge = dispatch.select("auto", dev, differentiable=False, fn="t", d=65, step=True)
    if status["triton"].available:
        assert small is dispatch.module("triton")
    if status["cuda"].available:
        assert large is dispatch.module("cuda")
    assert huge is reference


def test_unrolled_kernel_loops_are_inlined():
    """No loop body that lanes::loop unrolls is left out of line in the CPU kernel libraries.
    GCC's inlining limits had left the d = 9 dense solve's substitutions and the d = 16
    factorisation's as calls, their vectors passed through memory (solve_spd 25% slower at
    d = 9); MBF_INLINE forces them in, and a new kernel written without it shows up here."""
    nm = shutil.which("nm")
    libs = sorted(Path(mk.__file__).parent.glob("_cpu_*.so"))
    if nm is None or not libs:
        pytest.skip("needs the built CPU kernel libraries and binutils' nm")
    for lib in libs:
        symbols = subprocess.run([nm, "-C", str(lib)], capture_output=True, text=True,
                                 check=True).stdout.splitlines()
        calls = [s for s in symbols if "lambda(auto" in s]
        assert not calls, f"{lib.name}: {len(calls)} out-of-line loop bodies: {calls[0][:300]}"


def test_package_works_without_the_extension(tmp_path):
    """With mbf_kernels._C unloadable, import warns once and every op runs on the reference."""
    script = textwrap.dedent(
        """
        import importlib.abc, sys, warnings

        class BlockExtension(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "mbf_kernels._C":
                    raise ImportError("simulated: extension not built")
                return None

        sys.meta_path.insert(0, BlockExtension())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import mbf_kernels as mk
        msgs = [str(w.message) for w in caught if "mbf_kernels" in str(w.message)]
        assert len(msgs) == 1 and "torch reference backend" in msgs[0], msgs
        assert "\\n" not in msgs[0]
        import torch
        status = mk.backends()
        assert not status["cpu"].available and "simulated" in status["cpu"].detail
        A = torch.eye(3).expand(4, 3, 3) * 2
        x = mk.linalg.solve_spd(A, torch.ones(4, 3))
        assert torch.allclose(x, torch.full((4, 3), 0.5))
        try:
            mk.linalg.solve_spd(A, torch.ones(4, 3), backend="cpu")
        except RuntimeError as e:
            assert "backend 'cpu' is not available" in str(e)
        else:
            raise AssertionError("explicit cpu backend should raise")
        print("OK")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "MBF_KERNELS_QUIET"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "OK"


def test_triton_tile_tuning_can_be_switched_off(monkeypatch):
    """MBF_TRITON_AUTOTUNE=0 (the GPU check's correctness run) gives every kernel its first
    tile config, as the interpreter does; otherwise every config that fits d is tried."""
    pytest.importorskip("triton")
    from mbf_kernels import limits
    from mbf_kernels.triton import _common

    configs = [type("Config", (), dict(kwargs={"BLOCK": b}, num_warps=w))()
               for b, w in _common.CONFIGS]
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv(limits.TRITON_AUTOTUNE_ENV, raising=False)
    assert limits.triton_autotune()
    tried = _common._prune(configs, {"D": 16})
    assert len(tried) > 1 and all(_common.fits(c.kwargs["BLOCK"], c.num_warps, 16) for c in tried)
    monkeypatch.setenv(limits.TRITON_AUTOTUNE_ENV, "0")
    assert not limits.triton_autotune() and _common._prune(configs, {"D": 16}) == configs[:1]
    monkeypatch.delenv(limits.TRITON_AUTOTUNE_ENV)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not limits.triton_autotune() and _common._prune(configs, {"D": 16}) == configs[:1]
