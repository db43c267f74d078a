"""Backend discovery, automatic selection, the `mbf` command, and the pure-Python fallback."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import mbf_kernels as mk
from mbf_kernels import dispatch
from mbf_kernels import reference
from mbf_kernels.apps import cli


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


def test_mbf_info(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for name, status in mk.backends().items():
        assert name in out
    assert "torch" in out and torch.__version__ in out


def test_mbf_rejects_bad_sizes(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--sizes", "0"])
    assert "must be a positive integer" in capsys.readouterr().err


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "mbf_kernels.apps.cli", "info"], capture_output=True,
                         text=True, check=True).stdout
    assert "backends" in out


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
