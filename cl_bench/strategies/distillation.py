"""Knowledge-distillation losses shared by LwF, iCaRL, EEIL, BiC and generative replay.

- `kd_loss`: Hinton et al. (2015) soft-target distillation: cross-entropy between the
  teacher's and the student's temperature-softened distributions, scaled by T^2 so its
  gradient magnitude does not shrink with T. LwF (Li & Hoiem 2016, Eq. 2) uses this form
  with T = 2 on the old tasks' outputs.
- `sigmoid_distillation`: iCaRL (Rebuffi et al. 2017, Alg. 3): binary cross-entropy of the
  student's sigmoid outputs against the old model's sigmoid outputs on the old classes.
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
) -> torch.Tensor:
    """Mean over the batch of T^2 * CE(softmax(teacher / T), softmax(student / T)).

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
    return -(p_teacher * log_p_student).sum(dim=1).mean() * temperature**2


def sigmoid_distillation(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, outputs: Sequence[int] | torch.Tensor
) -> torch.Tensor:
    """BCE(sigmoid(student), sigmoid(teacher)) on `outputs`, summed over them, mean over the batch."""
    target = torch.sigmoid(teacher_logits.detach()[:, outputs])
    return F.binary_cross_entropy_with_logits(student_logits[:, outputs], target, reduction="sum") / len(
        student_logits
    )
