"""Online EWC (Schwarz et al., "Progress & Compress", ICML 2018, Sec. 2.3 Eq. 8).

Instead of one penalty per past task, a single running Fisher is kept,

    F*_k = gamma * F*_{k-1} + F_k,

anchored at the latest solution theta*_k, so memory and compute stay constant in the
number of tasks; gamma < 1 gradually forgets old constraints (gamma = 1 recovers a
sum of Fishers anchored at the last solution). The Fisher F_k is EWC's (`fisher`,
`fisher_samples`); the penalty is lambda/2 * sum_i F*_i (theta_i - theta*_i)^2.
"""

from __future__ import annotations

from cl_bench.data.stream import Task
from cl_bench.strategies.ewc import EWC
from cl_bench.strategies.importance import check_unit


class OnlineEWC(EWC):
    def __init__(
        self, ewc_lambda: float = 10000.0, gamma: float = 1.0, fisher: str = "true", fisher_samples: int = 1000
    ) -> None:
        super().__init__(ewc_lambda, fisher, fisher_samples)
        check_unit("gamma", gamma)
        self.gamma = float(gamma)

    def consolidate(self, task: Task) -> None:
        fisher = self.fisher_diagonal(task)
        if self.terms:
            fisher = [self.gamma * old + new for old, new in zip(self.terms[0][1], fisher)]
        self.set_term(fisher)
