"""Memory Aware Synapses (Aljundi et al., ECCV 2018).

Importance is the sensitivity of the learned function's output to each parameter,
unsupervised (no labels needed), averaged over the task's data (Eq. 4 with the
squared-L2-norm output, Sec. 4 "Global"):

    Omega_ij = (1/N) sum_k | d [ ||F(x_k; theta)||_2^2 ] / d theta_ij |

computed per sample (closed form for Linear layers, else torch.func.vmap) on `num_samples` training inputs (0 = all).
F is the output layer of the task: in task-IL the task's own outputs (the paper's
multi-head set-up on a shared head); in class-IL with `train.active_classes` the outputs
of the classes seen so far (as EWC's Fisher, so the rows of unseen classes get zero
importance and are not anchored to their random initial values); otherwise all
outputs. Importances accumulate over tasks (Omega <- Omega + Omega_new, Sec. 4), not
normalised (the authors' code, rahafaljundi/MAS-Memory-Aware-Synapses, keeps the raw
average), and the loss is
L_n + lambda * sum_ij Omega_ij (theta_ij - theta*_ij)^2 (Eq. 3), i.e. the shared
penalty with strength 2 * lambda.
"""

from __future__ import annotations

import torch

from cl_bench.data.stream import Task
from cl_bench.strategies.importance import QuadraticPenaltyStrategy, check_positive, mean_over_chunks


class MAS(QuadraticPenaltyStrategy):
    def __init__(self, mas_lambda: float = 0.1, num_samples: int = 0) -> None:
        super().__init__(mas_lambda, "mas_lambda", scale=2.0)
        check_positive("num_samples", num_samples, allow_zero=True)
        self.mas_lambda = float(mas_lambda)
        self.num_samples = int(num_samples)

    def output_sensitivity(self, task: Task) -> list[torch.Tensor]:
        x, _ = self.training_inputs(task, self.num_samples)
        if self.stream.scenario == "task_il":
            outputs = torch.tensor(task.outputs, device=self.device)
        elif self.inactive is not None:  # class-IL with train.active_classes: the classes seen so far
            outputs = (~self.inactive).nonzero().flatten()
        else:
            outputs = None
        task_index = torch.zeros(len(x), dtype=torch.long, device=self.device)

        def squared_norm(logits: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
            out = logits if outputs is None else logits[:, outputs]
            return out.pow(2).sum()

        with self.progress("MAS importance", total=len(x)) as advance:  # samples
            return mean_over_chunks(self.model, x, task_index, squared_norm, torch.abs, self.names, advance=advance)

    def consolidate(self, task: Task) -> None:
        omega = self.output_sensitivity(task)
        if self.terms:
            omega = [old + new for old, new in zip(self.terms[0][1], omega)]
        self.set_term(omega)
