"""The optimizer on every compiled backend and device: the same trajectories as the torch
backend on every block kind, backends refusing what they cannot serve by name, and on a GPU,
'auto' choosing per block size, a saved run moving between CPU and GPU, and a step that never
synchronises with the host."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import mbf_kernels as mk
from conftest import targets
from mbf_kernels.limits import TRITON_MAX_D as MAX_D
from test_optimizer import OPTIONS, batches, flat, make_net, train

needs_triton = pytest.mark.skipif(not mk.backends()["triton"].available,
                                  reason=mk.backends()["triton"].detail)
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # where the Triton kernels run


class TritonNet(nn.Module):
    """Every kind of block the Triton kernels take (d <= 16): 3x3 convs (one grouped), 1x1
    conv and norms (d = 1), a Linear with its bias (d = 13: tails) and one above
    max_block_size (shared, on torch)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1, groups=2, bias=False)
        self.conv3 = nn.Conv2d(6, 3, 1)
        self.fc1 = nn.Linear(3 * 4 * 4, 12)  # d = 49
        self.fc2 = nn.Linear(12, 5)  # d = 13

    def forward(self, x):
        x = F.relu(self.bn(self.conv1(x)))
        x = F.relu(self.conv3(F.relu(self.conv2(x))))
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


@pytest.mark.parametrize("target", targets(covering=16, step=True))
@pytest.mark.parametrize("decoupled", [False, True])
def test_optimizer_matches_the_torch_backend_on_every_block_kind(target, decoupled):
    """Each compiled backend, on its device, through the bucket op on every block kind the
    Triton kernels take: the same trajectory as the torch bucket step over 5 steps with T1 = 2,
    T2 = 3."""
    DEVICE = target.device
    out = []
    for backend in ("torch", target.backend):
        torch.manual_seed(0)
        model = TritonNet().double().to(DEVICE)
        opt = mk.MBF.from_model(model, backend=backend, max_block_size=32, weight_decay=1e-2,
                                decoupled_weight_decay=decoupled, **OPTIONS)
        train(model, opt, [(x.to(DEVICE), y.to(DEVICE)) for x, y in batches(5)])
        out.append((flat(model), opt.stats))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-9, atol=1e-11)
    assert out[1][1] == out[0][1]


@needs_triton
def test_triton_backend_names_its_block_size_limit():
    """A model with blocks the Triton kernels do not take (5x5 convs: d = 25) is refused by name;
    backend='auto' takes them elsewhere."""
    model = make_net().to(DEVICE)
    x, y = batches(1)[0]
    F.cross_entropy(model(x.to(DEVICE)), y.to(DEVICE)).backward()
    with pytest.raises(ValueError, match=rf"backend 'triton' takes blocks up to d = {MAX_D}"):
        mk.MBF.from_model(model, backend="triton", **OPTIONS).step()


@needs_triton
def test_triton_backend_refuses_a_device_it_cannot_run_on():
    w = torch.nn.Parameter(torch.randn(2, 1, 3, 3, device="meta"))
    w.grad = torch.zeros_like(w)
    with pytest.raises(ValueError, match="backend 'triton' cannot run on meta tensors"):
        mk.MBF([w], backend="triton").step()


@pytest.mark.parametrize("large_linear", ["shared", "lowrank"])
@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_triton), "torch"])
def test_cached_steps_read_nothing_back_from_the_device(backend, large_linear):
    """The GPU backends' cached steps (Triton's, and torch's fallback), shipped defaults
    (grafted: unit norms reduced per step), call nothing that reads a tensor's value on the
    host: on a GPU every such read is a device sync that stalls the step's queue (a checked
    segment_reduce made two per step, torch's cholesky_solve one per bucket). Counted on the
    CPU (Triton through its interpreter), as torch.profiler sees the reads."""
    torch.manual_seed(0)
    device = DEVICE if backend == "triton" else "cpu"
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 80),
                          nn.ReLU(), nn.Linear(80, 10)).to(device)
    opt = mk.MBF.from_model(model, backend=backend, large_linear=large_linear, shared_rank=8)
    x = torch.randn(4, 3, 8, 8, device=device)

    def iteration():
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()

    iteration()  # the first step refreshes and factors; the next ones until T1 are cached
    with torch.profiler.profile() as prof:
        for _ in range(3):
            iteration()
    reads = [e.name for e in prof.events()
             if e.name in ("aten::item", "aten::_local_scalar_dense")]
    assert not reads, reads


@pytest.mark.gpu
@needs_gpu
def test_optimizer_auto_on_gpu_matches_torch_backend():
    """make_net mixes every block kind: d = 9, 25, 21, 1 and a shared block. On the GPU 'auto'
    takes each bucket to the backend that covers it; the trajectory is the torch one."""
    out = []
    for backend in ("torch", "auto"):
        model = make_net().cuda()
        opt = mk.MBF.from_model(model, backend=backend, **OPTIONS)
        train(model, opt, [(x.cuda(), y.cuda()) for x, y in batches(5)])
        out.append((flat(model), opt.stats))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-9, atol=1e-11)
    assert out[1][1] == out[0][1]


@pytest.mark.gpu
@needs_gpu
def test_bfloat16_factor_on_gpu_where_the_step_reads_one():
    """factor_dtype="bfloat16" on a GPU under 'auto': the Triton buckets (d <= 16) and the CUDA
    kernels' at a hot size (d = 25 of make_net) store it, a CUDA bucket of another size (d = 21)
    keeps float32 and says so in block_summary; on TritonNet (every bucket d <= 16) the
    trajectory is the torch backend's, whose factor is rounded alike, to 2^-11 of the distance
    travelled (test_optimizer_factor_dtype.py: why)."""
    hot = mk._extension.build_info()["hot_block_sizes"]
    opt = mk.MBF.from_model(make_net(torch.float32).cuda(), factor_dtype="bfloat16")
    stored = {r["d"]: r["factor_dtype"] for r in opt.block_summary() if r["kind"] == "blocks"}
    assert stored == {d: "torch.bfloat16" if d <= MAX_D or d in hot else "torch.float32"
                      for d in stored}
    assert stored[21] == "torch.float32" and stored[25] == "torch.bfloat16"
    out = []
    for backend in ("torch", "auto"):
        torch.manual_seed(0)
        model = TritonNet().cuda()
        start = flat(model)
        opt = mk.MBF.from_model(model, backend=backend, max_block_size=32,
                                factor_dtype="bfloat16", **OPTIONS)
        train(model, opt, [(x.float().cuda(), y.cuda()) for x, y in batches(5)])
        assert {r["factor_dtype"] for r in opt.block_summary()
                if r["kind"] == "blocks"} == {"torch.bfloat16"}
        out.append(flat(model))
    assert (out[1] - out[0]).norm() <= 2.0 ** -11 * (out[0] - start).norm()


@pytest.mark.gpu
@needs_gpu
def test_state_dict_moves_between_cpu_and_gpu():
    """A run saved on the CPU resumes on the GPU with the same next steps (and back)."""
    data = batches(6)
    results = {}
    for route in ("cpu", "cpu->cuda", "cuda->cpu"):
        first, second = route.split("->") if "->" in route else (route, route)
        model = make_net().to(first)
        opt = mk.MBF.from_model(model, **OPTIONS)
        train(model, opt, [(x.to(first), y.to(first)) for x, y in data[:3]])
        saved_model, saved_opt = model.state_dict(), opt.state_dict()
        model = make_net().to(second)
        model.load_state_dict(saved_model)
        opt = mk.MBF.from_model(model, **OPTIONS)
        opt.load_state_dict(saved_opt)
        train(model, opt, [(x.to(second), y.to(second)) for x, y in data[3:]])
        results[route] = flat(model).cpu()
    torch.testing.assert_close(results["cpu->cuda"], results["cpu"], rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(results["cuda->cpu"], results["cpu"], rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("update", ["paper", "default"])
@pytest.mark.parametrize("target", targets(gpu_only=True))
def test_step_never_syncs_with_the_host(target, update):
    """A whole optimizer step is queued without a device synchronisation (the segment tables
    come from pinned memory or a cache), the paper's update and the shipped grafted one."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 6 * 6, 10)).cuda()
    opt = mk.MBF.from_model(model, backend=target.backend,
                            **(OPTIONS if update == "paper" else {}))
    x = torch.randn(4, 3, 8, 8, device="cuda")
    for _ in range(2):  # compile, tune and cache first
        model(x).square().mean().backward()
        opt.step()
    torch.cuda.set_sync_debug_mode("error")
    try:
        model(x).square().mean().backward()
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
