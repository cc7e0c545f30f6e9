"""The one quadratic-penalty mechanism shared by EWC, online EWC, SI, MAS and RWalk.

All five methods add to the task loss a penalty that ties every parameter to its value
at the end of earlier tasks, weighted by a per-parameter importance:

    L(theta) = L_task(theta) + (lambda / 2) * sum_k sum_i Omega_k,i (theta_i - theta*_k,i)^2

(EWC, Kirkpatrick et al. 2017, Eq. 3, keeps one term k per past task; the others keep a
single consolidated term.) They differ only in how Omega is estimated, so this module
holds the penalty, its gradient, the trajectory bookkeeping and the checkpoint state
once, and each method file plugs in an estimator through three hooks:

    observe(grads, deltas)   per step: the gradient of the task loss alone (before the
                             penalty) and the real change of each parameter made by the
                             optimizer step (SI, RWalk path integrals)
    consolidate(task)        at task end: compute the importance, then `add_term` (EWC)
                             or `set_term` (one running term)
    extra_state()/load_extra_state(state)   estimator state needed to resume

The penalty's gradient, lambda * Omega * (theta - theta*), is added to `.grad` in closed
form after the task loss's backward pass, so the task-loss gradient the path-integral
methods need comes for free without a second backward pass. Parameter snapshots are
real copies (`clone()`), never views of the live tensors: a view would make every
per-step change zero and silently turn SI into fine-tuning.

Step stability. The penalty's Hessian is diagonal, lambda * sum_k Omega_k, and plain
gradient descent on a quadratic of curvature h diverges when lr * h > 2 (with heavy-ball
momentum m: lr * h > 2 (1 + m)). Under train.optimizer=sgd, after each consolidation,
when lr * lambda * max_i sum_k Omega_k,i exceeds half that limit (1 + m; the task loss's
curvature adds to the penalty's), the strategy warns once (`Strategy.warn`) and from
then on applies the penalty as its exact proximal step after the optimizer's step on
the task loss,

    theta <- (theta + lr lambda sum_k Omega_k theta*_k) / (1 + lr lambda sum_k Omega_k),

stable for any strength, with the explicit step's fixed points and equal to it to first
order in lr (proximal gradient descent; AGS-CL's group penalties use the same device).
Below the bound, and under Adam/AdamW (whose steps are bounded by lr), the penalty's
gradient is added explicitly as above, so those runs are unchanged.

`mean_over_chunks` gives the mean over samples of squared (EWC's Fisher) or absolute
(MAS) per-sample gradients without per-sample loops: in closed form for Linear layers
(one matmul per chunk), through `torch.func.vmap` for any other model.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from cl_bench import CLBenchError
from cl_bench.data.stream import Split, Stream, Task
from cl_bench.strategies.base import Batch, Strategy


def check_positive(name: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise CLBenchError(f"strategy.{name} must be {'non-negative' if allow_zero else 'positive'}, got {value}")


def check_unit(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise CLBenchError(f"strategy.{name} must be in [0, 1], got {value}")


def sample_split(split: Split, num_samples: int) -> Split:
    """A random subset of `num_samples` (all when 0 or more than available); global RNG."""
    if num_samples <= 0 or num_samples >= len(split):
        return split
    return split.subset(torch.randperm(len(split))[:num_samples].to(split.y.device))


def per_sample_grads(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    chunk: int = 64,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yields, chunk by chunk, {name: (b, *shape)} gradients of fn(logits_i, y_i) for each sample."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n: b.detach() for n, b in model.named_buffers()}

    def one(p, xi, yi):
        logits = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return fn(logits, yi.unsqueeze(0))

    g = vmap(grad(one), in_dims=(None, 0, 0))
    for start in range(0, len(x), chunk):
        yield g(params, x[start : start + chunk], y[start : start + chunk])


class QuadraticPenaltyStrategy(Strategy):
    """Base of the importance-weighted quadratic penalty methods (see the module docstring)."""
    supports_loss_scaling = True  # every training-step gradient goes through backward/optimizer_step

    # True when the estimator needs the per-step gradients and parameter changes.
    tracks_trajectory = False

    def __init__(self, strength: float, strength_name: str = "strength", scale: float = 1.0) -> None:
        """`strength` is the user's value of `strategy.<strength_name>`; the penalty uses
        lambda = scale * strength (e.g. MAS's lambda * sum Omega (...)^2 is lambda = 2 * mas_lambda)."""
        check_positive(strength_name, strength, allow_zero=True)
        self.strength_name = strength_name
        self.scale = float(scale)
        self.strength = self.scale * float(strength)

    def setup(self, model: nn.Module, stream: Stream, train_cfg, device: torch.device) -> None:
        super().setup(model, stream, train_cfg, device)
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for p in model.parameters() if p.requires_grad]
        # One (anchor theta*, importance Omega) pair per term; each a list aligned with params.
        self.terms: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []
        # True when plain SGD's explicit step on the penalty would be unstable (see check_step_stability).
        self.proximal = False

    # ----- estimator hooks ----------------------------------------------------------------
    def observe(self, grads: list[torch.Tensor], deltas: list[torch.Tensor]) -> None:
        pass

    def consolidate(self, task: Task) -> None:
        raise NotImplementedError

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    # ----- terms --------------------------------------------------------------------------
    def snapshot(self) -> list[torch.Tensor]:
        """Real copies of the parameters (a view would follow the live tensor and read zero change)."""
        return torch._foreach_mul([p.detach() for p in self.params], 1.0)

    def add_term(self, importance: list[torch.Tensor]) -> None:
        self.terms.append((self.snapshot(), [w.detach().clone() for w in importance]))

    def set_term(self, importance: list[torch.Tensor]) -> None:
        self.terms = []
        self.add_term(importance)

    def max_importance(self) -> float:
        """max_i sum_k Omega_k,i: the penalty's Hessian is diagonal, lambda * sum_k Omega_k."""
        if not self.terms:
            return 0.0
        per_param = [sum(omega[i] for _, omega in self.terms) for i in range(len(self.params))]
        return max(float(w.max()) for w in per_param)

    def sgd_step_curvature(self) -> Optional[float]:
        """lr * lambda * max_i sum_k Omega_k,i under train.optimizer=sgd, else None (Adam's
        steps are bounded by lr whatever the curvature)."""
        name = getattr(self.train_cfg.optimizer, "value", self.train_cfg.optimizer)
        if name != "sgd":
            return None
        return float(self.train_cfg.lr) * self.strength * self.max_importance()

    def check_step_stability(self) -> None:
        """Under SGD, switch the penalty to its proximal step, and warn once, when the explicit
        step would be near or past its stability limit.

        The penalty (lambda / 2) sum_i Omega_i (theta_i - theta*_i)^2 has the diagonal
        Hessian lambda * Omega, and gradient descent on a quadratic of curvature h diverges
        when lr * h > 2 (heavy-ball momentum m: lr * h > 2 (1 + m)). The task loss's own
        curvature adds to the penalty's, so the bound used is half that limit:
        lr * lambda * max_i Omega_i > 1 + momentum. Past it, the penalty is applied by
        `_proximal_step` (stable for any strength) instead of through the gradient, so the
        run cannot blow up, and the user is told that the explicit step, which other
        implementations take, would not be stable at this strength.
        """
        value = self.sgd_step_curvature()
        limit = 1.0 + float(self.train_cfg.momentum)
        self.proximal = value is not None and value > limit
        if not self.proximal or self.__dict__.get("_stability_warned"):
            return
        self._stability_warned = True  # once per run: later tasks only raise the value
        user = self.strength / self.scale
        safe = user * limit / (2 * value)
        self.warn(
            f"{type(self).__name__}: train.lr * penalty curvature = {self.train_cfg.lr:g} * "
            f"{self.strength:.3g} * max importance {self.max_importance():.3g} = {value:.3g} > {limit:g} "
            f"(plain SGD on the penalty diverges above {2 * limit:g}; clbench now applies it as a proximal "
            f"step); for an explicit-gradient run lower strategy.{self.strength_name} (e.g. to {safe:.3g}) "
            f"or train.lr"
        )

    def importance_stats(self) -> dict:
        if not self.terms:
            return {"penalty_terms": 0}
        flat = torch.cat([w.flatten() for w in self.terms[-1][1]])
        stats = {
            "penalty_terms": len(self.terms),
            "importance_mean": float(flat.mean()),
            "importance_max": float(flat.max()),
            "importance_nonzero": float((flat != 0).float().mean()),
            "penalty_curvature_max": self.strength * self.max_importance(),
        }
        curvature = self.sgd_step_curvature()
        if curvature is not None:
            stats["sgd_lr_times_curvature"] = curvature
        return stats

    # ----- training -----------------------------------------------------------------------
    def task_loss(self, batch: Batch) -> torch.Tensor:
        return self.loss(self.model(batch.x), batch.y)

    @torch.no_grad()
    def _add_penalty_gradient(self, add: bool = True) -> torch.Tensor:
        """Adds lambda * sum_k Omega_k (theta - theta*_k) to .grad (unless `add` is False);
        returns the penalty value."""
        if not self.terms or self.strength == 0:
            return torch.zeros((), device=self.device)
        if add:
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            grads = [p.grad for p in self.params]
        values = []
        for anchor, omega in self.terms:  # foreach ops: a handful of kernels per term, not per tensor
            diffs = torch._foreach_sub(self.params, anchor)
            weighted = torch._foreach_mul(diffs, omega)
            if add:
                torch._foreach_add_(grads, weighted, alpha=self.strength)
            values += [product.sum() for product in torch._foreach_mul(weighted, diffs)]  # = (w * d).sum() each
        return torch.stack(values).sum() * (self.strength / 2)

    @torch.no_grad()
    def _proximal_step(self) -> None:
        """theta <- argmin_u ||u - theta||^2 / (2 lr) + (lambda / 2) sum_k Omega_k (u - theta*_k)^2
        = (theta + lr lambda sum_k Omega_k theta*_k) / (1 + lr lambda sum_k Omega_k), elementwise.

        The implicit (backward-Euler) step on the penalty: stable for any lr * lambda * Omega,
        and with the same fixed points as the explicit step (where lr * task gradient =
        -lr * lambda * Omega (theta - theta*)), to which it is equal to first order in lr.
        """
        rate = self.optimizer.param_groups[0]["lr"] * self.strength
        total = self.zeros()
        pull = self.zeros()
        for anchor, omega in self.terms:
            torch._foreach_add_(total, omega)
            torch._foreach_add_(pull, torch._foreach_mul(omega, anchor))
        live = [p.detach() for p in self.params]
        torch._foreach_add_(live, pull, alpha=rate)
        torch._foreach_mul_(total, rate)
        torch._foreach_add_(total, 1.0)
        torch._foreach_div_(live, total)

    def train_step(self, batch: Batch) -> dict:
        loss = self.task_loss(batch)
        self.optimizer.zero_grad(set_to_none=True)
        self.backward(loss)
        finite = self.unscale()  # fp16: the penalty gradient and the path integral need true gradients
        if self.tracks_trajectory:
            grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in self.params]
            before = self.snapshot()
        proximal = self.proximal and self.terms and self.strength != 0
        penalty = self._add_penalty_gradient(add=not proximal)
        self.optimizer_step()
        if proximal and finite:
            self._proximal_step()
        if self.tracks_trajectory and finite:
            with torch.no_grad():
                self.observe(grads, torch._foreach_sub([p.detach() for p in self.params], before))
        return {"loss": loss.detach() + penalty, "penalty": penalty}

    def after_task(self, task: Task) -> None:
        was_training = self.model.training
        self.model.eval()
        self.consolidate(task)
        self.model.train(was_training)
        self.check_step_stability()

    def summary(self) -> dict:
        return self.importance_stats()

    # ----- checkpoint ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"terms": self.terms, "extra": self.extra_state()}

    def load_state_dict(self, state: dict) -> None:
        self.terms = [
            ([a.to(self.device) for a in anchor], [w.to(self.device) for w in omega]) for anchor, omega in state["terms"]
        ]
        self.load_extra_state(state["extra"])
        self.check_step_stability()

    def zeros(self) -> list[torch.Tensor]:
        return [torch.zeros_like(p) for p in self.params]

    def training_inputs(self, task: Task, num_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Transformed inputs (no augmentation) and labels of up to num_samples training samples."""
        split = sample_split(task.train, num_samples)
        return self.stream.transform(split.x), split.y


def _linear_modules(model: nn.Module) -> Optional[dict[str, nn.Linear]]:
    """The model's Linear layers if they hold every trainable parameter, else None."""
    mods = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    covered = {f"{mn}.{pn}" if mn else pn for mn, m in mods.items() for pn, _ in m.named_parameters(recurse=False)}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return mods if trainable <= covered else None


def _linear_per_sample_reduction(
    model: nn.Module, mods: dict[str, nn.Linear], x, y, fn, reduce, names: list[str], chunk: int,
    done: Callable[[int], None] = lambda end: None,
) -> Optional[list[torch.Tensor]]:
    """sum_i reduce(per-sample gradient) in closed form for Linear layers.

    A Linear layer's per-sample weight gradient is the outer product g_i a_i^T of its
    output gradient and its input, so for reduce = square or abs (both multiplicative)
    sum_i reduce(g_i a_i^T) = reduce(G)^T reduce(A): one matmul per chunk instead of
    materialising every per-sample gradient. Exact when each layer sees each sample
    once as a (batch, features) input; returns None otherwise (the caller uses vmap).
    """
    totals = {n: torch.zeros_like(p) for n, p in model.named_parameters() if n in names}
    for start in range(0, len(x), chunk):
        inputs, outputs = {}, {}

        def keep(name):
            def hook(module, args, out):
                inputs[name], outputs[name] = args[0], out

            return hook

        handles = [m.register_forward_hook(keep(n)) for n, m in mods.items()]
        try:
            loss = fn(model(x[start : start + chunk]), y[start : start + chunk])
        finally:
            for h in handles:
                h.remove()
        if any(a.dim() != 2 for a in inputs.values()) or len(inputs) != len(mods):
            return None
        order = list(outputs)
        grads = torch.autograd.grad(loss, [outputs[n] for n in order])
        with torch.no_grad():
            for name, g in zip(order, grads):
                a, g = reduce(inputs[name].detach()), reduce(g)
                prefix = f"{name}." if name else ""
                if prefix + "weight" in totals:
                    totals[prefix + "weight"] += g.T @ a
                if prefix + "bias" in totals:
                    totals[prefix + "bias"] += g.sum(0)
        done(start + chunk)
    return [totals[n] for n in names]


def mean_over_chunks(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    reduce: Callable[[torch.Tensor], torch.Tensor],
    names: list[str],
    chunk: int = 256,
    advance: Optional[Callable[[int], None]] = None,
) -> list[torch.Tensor]:
    """mean_i reduce(per-sample gradient of fn) for each parameter, aligned with `names`.

    `fn(logits, y)` must return the SUM over the batch of the per-sample losses and
    `reduce` must be multiplicative (torch.square, torch.abs). MLPs take the closed form
    of `_linear_per_sample_reduction`; other models take torch.func.vmap. `advance(n)`
    (a `Strategy.progress` callable) is told of each chunk's n samples, len(x) in all.
    """
    reported = 0

    def done(end: int) -> None:  # samples [0, end) are done (counted once, whichever path ran them)
        nonlocal reported
        end = min(end, len(x))
        if advance is not None and end > reported:
            advance(end - reported)
            reported = end

    mods = _linear_modules(model)
    if mods is not None:
        total = _linear_per_sample_reduction(model, mods, x, y, fn, reduce, names, chunk, done)
        if total is not None:
            return [t / len(x) for t in total]
    total: Optional[list[torch.Tensor]] = None
    step = chunk // 4
    for k, g in enumerate(per_sample_grads(model, x, y, fn, step)):
        part = [reduce(g[n]).sum(0) for n in names]
        total = part if total is None else [t + p for t, p in zip(total, part)]
        done((k + 1) * step)
    return [t / len(x) for t in total]
