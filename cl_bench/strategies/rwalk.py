"""Riemannian Walk (Chaudhry, Dokania, Ajanthan & Torr, ECCV 2018, Sec. 4).

Two importances, both min-max normalised to [0, 1] over all parameters at task end:

- KL-based Fisher (Sec. 4.1, Eq. 10): a moving average of squared gradients of the task
  loss, F <- alpha * F_new + (1 - alpha) * F, where F_new averages the squared
  mini-batch gradients of the last `update_every` steps (the authors' code updates every
  10 steps with alpha = 0.9); it is never reset, so it carries over tasks.
- Path-integral score (Sec. 4.2, Eq. 7): over each interval of `update_every` steps,
  the loss drop attributed to a parameter, sum_steps -g * Delta theta, is normalised by
  the KL distance it travelled, 1/2 * F * (theta(t_end) - theta(t_start))^2 + eps, and
  the positive part is added to the task's score. Between tasks the score is averaged
  with the previous one, s <- (s + s_task) / 2 (Sec. 4.3), the first task's score kept
  as is.

The loss is L_k + lambda * sum_i (F_i + s_i) (theta_i - theta*_i)^2 (Eq. 9), with
theta* the latest task's solution: the shared penalty with importance 2 * (F + s).
Works single-head (class-IL) and multi-head (task-IL via restricted outputs).
"""

from __future__ import annotations

import torch

from cl_bench.data.stream import Task
from cl_bench.strategies.importance import QuadraticPenaltyStrategy, check_positive, check_unit


def min_max(tensors: list[torch.Tensor], eps: float = 1e-10) -> list[torch.Tensor]:
    lo = min(float(t.min()) for t in tensors)
    hi = max(float(t.max()) for t in tensors)
    return [(t - lo) / (hi - lo + eps) for t in tensors]


class RWalk(QuadraticPenaltyStrategy):
    tracks_trajectory = True

    def __init__(
        self, rwalk_lambda: float = 1.0, alpha: float = 0.9, update_every: int = 10, epsilon: float = 1e-3
    ) -> None:
        super().__init__(rwalk_lambda, "rwalk_lambda", scale=2.0)
        check_unit("alpha", alpha)
        check_positive("update_every", update_every)
        check_positive("epsilon", epsilon)
        self.alpha, self.update_every, self.epsilon = float(alpha), int(update_every), float(epsilon)
        self.fisher: list[torch.Tensor] = []  # running KL-Fisher, kept across tasks
        self.score: list[torch.Tensor] = []  # averaged path-integral score of past tasks

    def before_task(self, task: Task) -> None:
        super().before_task(task)
        self.task_score = self.zeros()
        self._reset_interval()

    def _reset_interval(self) -> None:
        self.steps = 0
        self.grad_sq = self.zeros()
        self.loss_drop = self.zeros()
        self.interval_start = self.snapshot()

    def observe(self, grads: list[torch.Tensor], deltas: list[torch.Tensor]) -> None:
        torch._foreach_add_(self.grad_sq, torch._foreach_mul(grads, grads))
        torch._foreach_sub_(self.loss_drop, torch._foreach_mul(grads, deltas))
        self.steps += 1
        if not self.fisher:  # the very first step initialises the running Fisher
            self.fisher = [sq.clone() for sq in self.grad_sq]
        if self.steps == self.update_every:
            for s, drop, f, p, p0 in zip(self.task_score, self.loss_drop, self.fisher, self.params, self.interval_start):
                s.add_((drop / (0.5 * f * (p.detach() - p0) ** 2 + self.epsilon)).clamp_(min=0))
            for f, sq in zip(self.fisher, self.grad_sq):
                f.mul_(1 - self.alpha).add_(sq, alpha=self.alpha / self.steps)
            self._reset_interval()

    def consolidate(self, task: Task) -> None:
        if self.score:
            self.score = [(old + new) / 2 for old, new in zip(self.score, self.task_score)]
        else:
            self.score = [s.clone() for s in self.task_score]
        fisher = self.fisher or self.zeros()
        self.set_term([f + s for f, s in zip(min_max(fisher), min_max(self.score))])

    def extra_state(self) -> dict:
        return {"fisher": self.fisher, "score": self.score}

    def load_extra_state(self, state: dict) -> None:
        self.fisher = [f.to(self.device) for f in state["fisher"]]
        self.score = [s.to(self.device) for s in state["score"]]
