"""Elastic Weight Consolidation (Kirkpatrick et al., PNAS 2017).

After each task k the diagonal Fisher information at the task's solution theta*_k,

    F_k,i = E_x E_{y ~ p(y|x)} [ (d log p(y|x; theta) / d theta_i)^2 ]   (Eq. 3 and its SI),

becomes the importance of one penalty term per past task (Eq. 3 summed over tasks, as in
the paper's multi-task extension):

    L(theta) = L_T(theta) + sum_{k<T} (lambda / 2) sum_i F_k,i (theta_i - theta*_k,i)^2

`fisher=true` draws y from the model's own predictive distribution (the true Fisher
of the paper); `fisher=empirical` uses the observed label instead (the common
"empirical Fisher"); `fisher=predicted` uses the model's most likely label (the
estimate in van de Ven & Tolias's code, continual_learner.py `estimate_fisher`). Squared gradients are taken per sample, over
`fisher_samples` random training samples of the task (0 = all), with the model in eval
mode (per-sample squares in closed form for Linear layers, see `importance`). The
log-likelihood is the one the task loss uses: in task-IL restricted to the
task's outputs (the shared-head view of the paper's multi-head set-up).
The penalty itself is the shared `QuadraticPenaltyStrategy`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cl_bench import CLBenchError
from cl_bench.data.stream import Task
from cl_bench.strategies.importance import QuadraticPenaltyStrategy, check_positive, mean_over_chunks


class EWC(QuadraticPenaltyStrategy):
    def __init__(self, ewc_lambda: float = 1000.0, fisher: str = "true", fisher_samples: int = 1000) -> None:
        super().__init__(ewc_lambda, "ewc_lambda")
        fisher = str(fisher).lower()  # `strategy.fisher=true` on the command line arrives as a bool
        if fisher not in ("empirical", "true", "predicted"):
            raise CLBenchError(f"strategy.fisher must be true, empirical or predicted, got {fisher!r}")
        check_positive("fisher_samples", fisher_samples, allow_zero=True)
        self.fisher = fisher
        self.fisher_samples = int(fisher_samples)

    def fisher_diagonal(self, task: Task) -> list[torch.Tensor]:
        x, y = self.training_inputs(task, self.fisher_samples)
        if self.fisher in ("true", "predicted"):
            with torch.no_grad():
                probs = F.softmax(self.restrict(self.model(x), y), dim=1)
                y = torch.multinomial(probs, 1).squeeze(1) if self.fisher == "true" else probs.argmax(1)

        def nll(logits: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(self.restrict(logits, yi), yi, reduction="sum")

        with self.progress("Fisher", total=len(x)) as advance:  # samples
            return mean_over_chunks(self.model, x, y, nll, torch.square, self.names, advance=advance)

    def consolidate(self, task: Task) -> None:
        self.add_term(self.fisher_diagonal(task))
