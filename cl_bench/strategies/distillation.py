"""Knowledge-distillation pieces shared by LwF, iCaRL, EEIL and BiC.

- `kd_loss`: soft-target distillation, the cross-entropy between the teacher's and the
  student's temperature-softened distributions. Whether it is scaled by T^2 differs by
  paper, so it is the caller's choice (`t_squared`):
  - Hinton et al. (2015) scale by T^2 so the gradient magnitude does not shrink with T;
    LwF here keeps that form (van de Ven & Tolias's code does the same).
  - EEIL (Castro et al. 2018, Eq. 2-3) and BiC (Wu et al. 2019, Eq. 1-2) define the
    distillation loss without T^2; EEIL's authors' code (MatConvNet, `vl_nnsoftmaxdiff.m`,
    mode "MI") computes log-sum-exp minus <c, x/T> with derivative (softmax - c) / T and
    weight 1 (`fork_resnet_distillation.m`): no T^2 either.
- `sigmoid_targets`: iCaRL's targets (Rebuffi et al. 2017, Alg. 3 and the authors' code):
  one-hot labels over all outputs, the old classes' columns replaced by the previous
  model's sigmoid outputs (distillation).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 2.0,
    outputs: Optional[Sequence[int] | torch.Tensor] = None,
    t_squared: bool = True,
) -> torch.Tensor:
    """Mean over the batch of CE(softmax(teacher / T), softmax(student / T)), times T^2
    when `t_squared` (Hinton et al.'s scaling; EEIL and BiC pass False, see above).

    `outputs` restricts both distributions to a subset of the output units (e.g. the
    old classes, or one old task's head in task-IL). A teacher with fewer columns than
    the student covers the student's leading columns and puts zero mass on the rest
    (van de Ven & Tolias's class-IL LwF: old classes first, then the new ones).
    """
    if outputs is not None:
        student_logits = student_logits[:, outputs]
        teacher_logits = teacher_logits[:, outputs]
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)
    p_teacher = F.softmax(teacher_logits.detach() / temperature, dim=1)
    log_p_student = log_p_student[:, : p_teacher.shape[1]]
    loss = -(p_teacher * log_p_student).sum(dim=1).mean()
    return loss * temperature**2 if t_squared else loss


def sigmoid_targets(
    labels: torch.Tensor,
    num_outputs: int,
    teacher_logits: Optional[torch.Tensor] = None,
    old: Optional[Sequence[int] | torch.Tensor] = None,
) -> torch.Tensor:
    """iCaRL's binary targets (N, num_outputs): the one-hot label, except that the old
    classes' columns hold sigmoid(teacher) (Alg. 3; the authors' code builds the same
    matrix over all outputs, later classes' columns 0)."""
    target = F.one_hot(labels, num_outputs).to(torch.float32)
    if teacher_logits is not None and old is not None and len(old):
        target[:, old] = torch.sigmoid(teacher_logits.detach()[:, old].float())
    return target
