"""The refinements' optimisers, without ``torch.optim``: L-BFGS with a strong-Wolfe line search
(:class:`LBFGS`, the 6-DOF refinement) and Rprop (:class:`Rprop`, every slice's own refinement).

Why not ``torch.optim``: since torch 2.x every ``torch.optim.Optimizer`` constructor is
wrapped by ``torch._disable_dynamo``, which imports ``torch._dynamo`` (and with it sympy, FSDP and
``torch.distributed.tensor``) on first use: 2.2-3.1 s on a 2-core CPU, paid by every command-line
run inside its first refinement. The refinements optimise six (or, per slice, three) numbers, so
the algorithms are small: these are ``torch.optim.LBFGS.step`` with its line search and
``torch.optim.Rprop``'s single-tensor update (torch 2.14, ``torch/optim/lbfgs.py`` and
``rprop.py``, BSD-3-Clause; L-BFGS itself ported there from Mark Schmidt's minFunc and the Lua
``optim`` package) restricted to one dense real tensor and kept step for step, so results match
``torch.optim`` to rounding (``Testing/test_optimisers.py`` compares them).
"""

from __future__ import annotations

from typing import Callable

import torch

Closure = Callable[[], torch.Tensor]


def _cubic_interpolate(x1: float, f1: float, g1: torch.Tensor | float, x2: float, f2: float,
                       g2: torch.Tensor | float, bounds: tuple[float, float] | None = None) -> float:
    """Minimiser of the cubic through two points with values and slopes, clipped to ``bounds``
    (the interval between the points when None); the middle of the bounds when the cubic has none."""
    xmin_bound, xmax_bound = bounds if bounds is not None else ((x1, x2) if x1 <= x2 else (x2, x1))
    d1 = g1 + g2 - 3 * (f1 - f2) / (x1 - x2)
    d2_square = d1**2 - g1 * g2
    if d2_square >= 0:
        d2 = d2_square.sqrt() if isinstance(d2_square, torch.Tensor) else d2_square**0.5
        if x1 <= x2:
            min_pos = x2 - (x2 - x1) * ((g2 + d2 - d1) / (g2 - g1 + 2 * d2))
        else:
            min_pos = x1 - (x1 - x2) * ((g1 + d2 - d1) / (g1 - g2 + 2 * d2))
        return min(max(min_pos, xmin_bound), xmax_bound)
    return (xmin_bound + xmax_bound) / 2.0


def strong_wolfe(obj_func: Callable[[torch.Tensor, float, torch.Tensor], tuple[float, torch.Tensor]],
                 x: torch.Tensor, t: float, d: torch.Tensor, f: float, g: torch.Tensor, gtd: torch.Tensor,
                 c1: float = 1e-4, c2: float = 0.9, tolerance_change: float = 1e-9,
                 max_ls: int = 25) -> tuple[float, torch.Tensor, float, int]:
    """Line search along ``d`` from ``x`` (value ``f``, gradient ``g``, slope ``gtd``) for a step
    ``t`` meeting the strong Wolfe conditions (bracketing, then zoom by cubic interpolation), with
    at most ``max_ls`` evaluations ``obj_func(x, t, d) -> (value, gradient)``.
    Returns the value, gradient and step of the best point found and the evaluations made."""
    d_norm = d.abs().max()
    g = g.clone(memory_format=torch.contiguous_format)
    f_new, g_new = obj_func(x, t, d)
    ls_func_evals = 1
    gtd_new = g_new.dot(d)

    # bracket an interval containing a point satisfying the Wolfe criteria
    t_prev, f_prev, g_prev, gtd_prev = 0.0, f, g, gtd
    done = False
    ls_iter = 0
    bracket: list[float] = []
    bracket_f: list[float] = []
    bracket_g: list[torch.Tensor] = []
    bracket_gtd: list[torch.Tensor] = []
    while ls_iter < max_ls:
        if f_new > (f + c1 * t * gtd) or (ls_iter > 1 and f_new >= f_prev):
            bracket, bracket_f = [t_prev, t], [f_prev, f_new]
            bracket_g, bracket_gtd = [g_prev, g_new.clone(memory_format=torch.contiguous_format)], [gtd_prev, gtd_new]
            break
        if abs(gtd_new) <= -c2 * gtd:
            bracket, bracket_f, bracket_g = [t], [f_new], [g_new]
            done = True
            break
        if gtd_new >= 0:
            bracket, bracket_f = [t_prev, t], [f_prev, f_new]
            bracket_g, bracket_gtd = [g_prev, g_new.clone(memory_format=torch.contiguous_format)], [gtd_prev, gtd_new]
            break
        # extrapolate
        min_step = t + 0.01 * (t - t_prev)
        max_step = t * 10
        tmp = t
        t = _cubic_interpolate(t_prev, f_prev, gtd_prev, t, f_new, gtd_new, bounds=(min_step, max_step))
        t_prev, f_prev, gtd_prev = tmp, f_new, gtd_new
        g_prev = g_new.clone(memory_format=torch.contiguous_format)
        f_new, g_new = obj_func(x, t, d)
        ls_func_evals += 1
        gtd_new = g_new.dot(d)
        ls_iter += 1

    if ls_iter == max_ls:  # out of evaluations while bracketing
        bracket, bracket_f, bracket_g = [0.0, t], [f, f_new], [g, g_new]

    # zoom: shrink the bracket until a point satisfies the criteria
    insuf_progress = False
    low_pos, high_pos = (0, 1) if bracket_f[0] <= bracket_f[-1] else (1, 0)
    while not done and ls_iter < max_ls:
        if abs(bracket[1] - bracket[0]) * d_norm < tolerance_change:  # bracket too small
            break
        t = _cubic_interpolate(bracket[0], bracket_f[0], bracket_gtd[0], bracket[1], bracket_f[1], bracket_gtd[1])
        # a trial too close to an end of the bracket (twice, or outside it) moves 10% inside
        eps = 0.1 * (max(bracket) - min(bracket))
        if min(max(bracket) - t, t - min(bracket)) < eps:
            if insuf_progress or t >= max(bracket) or t <= min(bracket):
                t = max(bracket) - eps if abs(t - max(bracket)) < abs(t - min(bracket)) else min(bracket) + eps
                insuf_progress = False
            else:
                insuf_progress = True
        else:
            insuf_progress = False

        f_new, g_new = obj_func(x, t, d)
        ls_func_evals += 1
        gtd_new = g_new.dot(d)
        ls_iter += 1

        if f_new > (f + c1 * t * gtd) or f_new >= bracket_f[low_pos]:
            # Armijo condition not met, or not lower than the lowest point: the new high end
            bracket[high_pos], bracket_f[high_pos] = t, f_new
            bracket_g[high_pos] = g_new.clone(memory_format=torch.contiguous_format)
            bracket_gtd[high_pos] = gtd_new
            low_pos, high_pos = (0, 1) if bracket_f[0] <= bracket_f[1] else (1, 0)
        else:
            if abs(gtd_new) <= -c2 * gtd:
                done = True  # Wolfe conditions met
            elif gtd_new * (bracket[high_pos] - bracket[low_pos]) >= 0:
                # the old low end becomes the high end
                bracket[high_pos], bracket_f[high_pos] = bracket[low_pos], bracket_f[low_pos]
                bracket_g[high_pos], bracket_gtd[high_pos] = bracket_g[low_pos], bracket_gtd[low_pos]
            # the new point becomes the low end
            bracket[low_pos], bracket_f[low_pos] = t, f_new
            bracket_g[low_pos] = g_new.clone(memory_format=torch.contiguous_format)
            bracket_gtd[low_pos] = gtd_new

    return bracket_f[low_pos], bracket_g[low_pos], bracket[low_pos], ls_func_evals


class LBFGS:
    """``torch.optim.LBFGS(params=[param], lr, max_iter, max_eval, tolerance_grad,
    tolerance_change, history_size, line_search_fn="strong_wolfe")`` for one real tensor
    ``param`` (module docstring). ``step(closure)`` makes up to ``max_iter`` iterations; the
    closure computes the loss with autograd enabled, leaves the gradient in ``param.grad`` and
    returns the loss. The history is kept between ``step`` calls; ``max_eval`` may be changed
    between them, as torch's ``param_groups[0]["max_eval"]``."""

    def __init__(self, param: torch.Tensor, lr: float = 1.0, max_iter: int = 20, max_eval: int | None = None,
                 tolerance_grad: float = 1e-7, tolerance_change: float = 1e-9, history_size: int = 100) -> None:
        self.param = param
        self.lr = float(lr)
        self.max_iter = int(max_iter)
        self.max_eval = int(max_eval) if max_eval is not None else self.max_iter * 5 // 4
        self.tolerance_grad = float(tolerance_grad)
        self.tolerance_change = float(tolerance_change)
        self.history_size = int(history_size)
        self.func_evals = 0
        self.n_iter = 0
        self._d: torch.Tensor | None = None
        self._t: float | None = None
        self._old_dirs: list[torch.Tensor] = []
        self._old_stps: list[torch.Tensor] = []
        self._ro: list[torch.Tensor] = []
        self._h_diag: torch.Tensor | float = 1.0
        self._prev_flat_grad: torch.Tensor | None = None
        self._al: list[torch.Tensor | None] = [None] * self.history_size

    def _flat_grad(self) -> torch.Tensor:
        g = self.param.grad
        return self.param.new_zeros(self.param.numel()) if g is None else g.reshape(-1)

    def _directional_evaluate(self, closure: Closure, x: torch.Tensor, t: float,
                              d: torch.Tensor) -> tuple[float, torch.Tensor]:
        self.param.add_(d.view_as(self.param), alpha=t)
        with torch.enable_grad():
            loss = float(closure().detach())
        flat_grad = self._flat_grad()
        self.param.copy_(x)
        return loss, flat_grad

    @torch.no_grad()
    def step(self, closure: Closure) -> torch.Tensor:
        """One call of ``torch.optim.LBFGS.step`` (up to ``max_iter`` iterations); returns the
        loss at the starting point."""
        with torch.enable_grad():
            orig_loss = closure()
        loss = float(orig_loss.detach())
        current_evals = 1
        self.func_evals += 1
        flat_grad = self._flat_grad()
        if flat_grad.abs().max() <= self.tolerance_grad:  # already optimal
            return orig_loss

        d, t = self._d, self._t
        n_iter = 0
        while n_iter < self.max_iter:
            n_iter += 1
            self.n_iter += 1
            # the descent direction
            if self.n_iter == 1:
                d = flat_grad.neg()
                self._old_dirs, self._old_stps, self._ro, self._h_diag = [], [], [], 1.0
            else:
                y = flat_grad.sub(self._prev_flat_grad)
                s = d.mul(t)
                ys = y.dot(s)
                if ys > 1e-10:  # update the memory
                    if len(self._old_dirs) == self.history_size:
                        self._old_dirs.pop(0)
                        self._old_stps.pop(0)
                        self._ro.pop(0)
                    self._old_dirs.append(y)
                    self._old_stps.append(s)
                    self._ro.append(1.0 / ys)
                    self._h_diag = ys / y.dot(y)
                # two-loop recursion: the approximate inverse Hessian times the gradient
                al = self._al
                q = flat_grad.neg()
                for i in range(len(self._old_dirs) - 1, -1, -1):
                    al[i] = self._old_stps[i].dot(q) * self._ro[i]
                    q.add_(self._old_dirs[i], alpha=-al[i])
                d = r = torch.mul(q, self._h_diag)
                for i in range(len(self._old_dirs)):
                    be_i = self._old_dirs[i].dot(r) * self._ro[i]
                    r.add_(self._old_stps[i], alpha=al[i] - be_i)

            if self._prev_flat_grad is None:
                self._prev_flat_grad = flat_grad.clone(memory_format=torch.contiguous_format)
            else:
                self._prev_flat_grad.copy_(flat_grad)
            prev_loss = loss

            # the step length
            t = min(1.0, 1.0 / flat_grad.abs().sum()) * self.lr if self.n_iter == 1 else self.lr
            gtd = flat_grad.dot(d)
            if gtd > -self.tolerance_change:  # no descent along d
                break
            x_init = self.param.clone(memory_format=torch.contiguous_format)
            loss, flat_grad, t, ls_func_evals = strong_wolfe(
                lambda x, t, d: self._directional_evaluate(closure, x, t, d), x_init, t, d, loss, flat_grad, gtd,
                max_ls=self.max_eval - current_evals)
            self.param.add_(d.view_as(self.param), alpha=t)
            opt_cond = flat_grad.abs().max() <= self.tolerance_grad
            current_evals += ls_func_evals
            self.func_evals += ls_func_evals

            if n_iter == self.max_iter or current_evals >= self.max_eval or opt_cond:
                break
            if d.mul(t).abs().max() <= self.tolerance_change:  # no progress
                break
            if abs(loss - prev_loss) < self.tolerance_change:
                break

        self._d, self._t = d, t
        return orig_loss


class Rprop:
    """``torch.optim.Rprop([param], lr, etas, step_sizes)`` for one real tensor: each element
    moves by its own step size against the sign of its gradient; the step grows by ``etas[1]``
    while the sign holds and shrinks by ``etas[0]`` (and that element rests once) when it flips,
    clamped to ``step_sizes``. ``step()`` reads ``param.grad``."""

    def __init__(self, param: torch.Tensor, lr: float = 0.01, etas: tuple[float, float] = (0.5, 1.2),
                 step_sizes: tuple[float, float] = (1e-6, 50.0)) -> None:
        self.param = param
        self.etaminus, self.etaplus = (float(e) for e in etas)
        self.step_min, self.step_max = (float(s) for s in step_sizes)
        self._prev = torch.zeros_like(param, memory_format=torch.preserve_format)
        self._step_size = torch.full_like(param, float(lr))

    @torch.no_grad()
    def step(self) -> None:
        grad = self.param.grad
        if grad is None:
            return
        sign = grad.mul(self._prev).sign()
        sign[sign.gt(0)] = self.etaplus
        sign[sign.lt(0)] = self.etaminus
        sign[sign.eq(0)] = 1
        self._step_size.mul_(sign).clamp_(self.step_min, self.step_max)
        grad = grad.clone(memory_format=torch.preserve_format)
        grad[sign.eq(self.etaminus)] = 0
        self.param.addcmul_(grad.sign(), self._step_size, value=-1)
        self._prev.copy_(grad)
