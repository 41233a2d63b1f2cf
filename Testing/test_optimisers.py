"""The refinements' own L-BFGS and Rprop (optimisers.py) against torch.optim, step for step, and
the reason they exist: a refinement must not import torch._dynamo (2-3 s on first use)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from RigidResNetRegistrationLib.optimisers import LBFGS, Rprop


def _loss(p: torch.Tensor) -> torch.Tensor:
    """A non-quadratic 6-parameter bowl with coupled terms (Rosenbrock-like valleys)."""
    x = p.view(-1)
    return ((1 - x[:-1]) ** 2).sum() + 5.0 * ((x[1:] - x[:-1] ** 2) ** 2).sum() + 0.1 * torch.cos(3 * x).sum()


@pytest.mark.parametrize("max_iter, history", [(1, 10), (5, 3)])
def test_lbfgs_follows_torch_optim_lbfgs_step_for_step(max_iter: int, history: int) -> None:
    start = torch.tensor([-1.2, 1.0, 0.3, -0.5, 2.0, 0.7], dtype=torch.float64)
    ours_p = start.clone().requires_grad_(True)
    ref_p = start.clone().requires_grad_(True)
    ours = LBFGS(ours_p, lr=1.0, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-7, history_size=history)
    ref = torch.optim.LBFGS([ref_p], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-7,
                            history_size=history, line_search_fn="strong_wolfe")

    def closure_for(p: torch.Tensor):
        def closure() -> torch.Tensor:
            p.grad = None
            loss = _loss(p)
            loss.backward()
            return loss
        return closure

    moved = False
    for step in range(12):
        ours.max_eval = ref.param_groups[0]["max_eval"] = 7 + step % 3  # changed between calls, as refine does
        before = ours_p.detach().clone()
        ours.step(closure_for(ours_p))
        ref.step(closure_for(ref_p))
        moved |= bool((ours_p.detach() - before).abs().max() > 1e-3)
        torch.testing.assert_close(ours_p.detach(), ref_p.detach(), rtol=0, atol=1e-12)
    assert moved
    assert float(_loss(ours_p.detach())) < float(_loss(start)) - 1.0  # it did minimise


def test_rprop_follows_torch_optim_rprop() -> None:
    start = torch.tensor([[-1.2, 1.0, 0.3], [0.5, 2.0, -0.7]], dtype=torch.float64)
    ours_p = start.clone().requires_grad_(True)
    ref_p = start.clone().requires_grad_(True)
    ours = Rprop(ours_p, lr=0.05, etas=(0.5, 1.2), step_sizes=(1e-4, 0.5))
    ref = torch.optim.Rprop([ref_p], lr=0.05, etas=(0.5, 1.2), step_sizes=(1e-4, 0.5), foreach=False)
    for _ in range(40):
        for p, opt in ((ours_p, ours), (ref_p, ref)):
            p.grad = None
            _loss(p).backward()
            opt.step()
        torch.testing.assert_close(ours_p.detach(), ref_p.detach(), rtol=0, atol=1e-12)
    assert float((ours_p.detach() - start).abs().max()) > 0.5


def test_refinement_does_not_import_torch_dynamo() -> None:
    """torch.optim's constructors import torch._dynamo (2-3 s on a 2-core CPU); both refinements
    run without it, in a fresh interpreter."""
    code = textwrap.dedent(
        """
        import sys, numpy as np, torch
        from RigidResNetRegistrationLib import geometry as geo
        from RigidResNetRegistrationLib.refine import refine_rigid, refine_slices
        g = np.mgrid[:32, :32, :24].astype(np.float32)
        vol = np.exp(-(((g[0] - 16) / 7) ** 2 + ((g[1] - 14) / 9) ** 2 + ((g[2] - 12) / 5) ** 2)).astype(np.float32)
        vol += 0.5 * (g[0] > 20) * (g[2] > 10)
        t = torch.from_numpy(vol)
        aff = np.diag([2.0, 2.0, 2.0, 1.0])
        r = refine_rigid(t, aff, t, aff, geo.rigid_matrix_3d(np.zeros(3), np.array([2.0, -1.0, 1.0])), metric="ncc", levels_mm=(4.0,))
        assert r.steps > 0, r
        frame = geo.slice_frame(aff, vol.shape, "axial")
        s = refine_slices(t, aff, t, aff, frame, np.arange(6, 18), np.zeros((12, 3)), (32, 32), 2.0, metric="ncc",
                          steps=3)
        assert s.steps == 3, s
        print("dynamo" if "torch._dynamo" in sys.modules else "clean")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("clean"), out.stdout
