"""Synaptic Intelligence (Zenke, Poole & Ganguli, ICML 2017).

Along the training trajectory of task mu each parameter accumulates its contribution to
the drop of the task loss, the path integral (Eq. 3 discretised per optimizer step):

    omega^mu_k = sum_steps -g_k(t) * Delta theta_k(t),

with g the gradient of the task loss alone (the unregularised gradient, as in the
authors' code) and Delta theta the parameter change actually made by the step, measured
on real snapshots (copies taken before each step, never views). At the end of the task
(Eq. 5):

    Omega_k += omega^mu_k / ((Delta_k^mu)^2 + xi),   Delta_k^mu = theta_k(end) - theta_k(start)

and the surrogate loss is c * sum_k Omega_k (theta_k - theta*_k)^2 (Eq. 4), i.e. the
shared penalty with lambda = 2c. omega can turn negative under momentum/Adam; the
normalised contribution is clamped at zero (as in Chaudhry et al.'s reimplementation)
so the penalty stays convex.
"""

from __future__ import annotations

import torch

from cl_bench.data.stream import Task
from cl_bench.strategies.importance import QuadraticPenaltyStrategy, check_positive


class SI(QuadraticPenaltyStrategy):
    tracks_trajectory = True

    def __init__(self, c: float = 3.0, xi: float = 0.1) -> None:
        super().__init__(c, "c", scale=2.0)
        check_positive("xi", xi)
        self.c, self.xi = float(c), float(xi)
        self.omega_sum: list[torch.Tensor] = []

    def before_task(self, task: Task) -> None:
        super().before_task(task)
        self.path = self.zeros()  # omega of this task
        self.start = self.snapshot()  # theta at the task start (a copy)
        if not self.omega_sum:
            self.omega_sum = self.zeros()

    def observe(self, grads: list[torch.Tensor], deltas: list[torch.Tensor]) -> None:
        torch._foreach_sub_(self.path, torch._foreach_mul(grads, deltas))

    def consolidate(self, task: Task) -> None:
        for total, w, p, p0 in zip(self.omega_sum, self.path, self.params, self.start):
            total.add_((w / ((p.detach() - p0) ** 2 + self.xi)).clamp_(min=0))
        self.set_term(self.omega_sum)

    def summary(self) -> dict:
        stats = self.importance_stats()
        if self.terms:
            stats["path_integral_sum"] = float(sum(w.sum() for w in self.path))
        return stats

    def extra_state(self) -> dict:
        return {"omega_sum": self.omega_sum}

    def load_extra_state(self, state: dict) -> None:
        self.omega_sum = [w.to(self.device) for w in state["omega_sum"]]
