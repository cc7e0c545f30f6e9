"""PODNet (Douillard, Cord, Ollion, Robert, Valle, ECCV 2020, "PODNet: Pooled Outputs
Distillation for Small-Tasks Incremental Learning"). Paper and the authors' code
(github arthurdouillard/incremental_learning.pytorch: `inclearn/models/podnet.py`,
`lib/losses/distillation.py::pod`, `lib/losses/base.py::nca`, `lib/network/classifiers.py::
CosineClassifier`, `options/podnet/podnet_cnn_cifar100.yaml`):

- Local similarity classifier (LSC, Eq. 5-6): K proxies per class (`proxies`, 10), class
  similarity s_c = sum_k softmax_k(s_ck) s_ck. The authors' similarity is minus the squared
  distance of the L2-normalised vectors (`neg_stable_cosine_distance`), s_ck = -|h/|h| -
  theta_ck/|theta_ck||^2 = 2 cos_ck - 2, so their softmax over proxies is softmax(2 cos_ck):
  here the shared `CosineHead` with gamma = 2 and s_c = 2 * head.cosine(h) - 2, exactly theirs.
  The backbone's last ReLU is removed (`set_last_relu(False)`; their `raw_features`).
- NCA loss (Eq. 7) with margin delta and the learned scale eta (the head's sigma,
  initialised at 1, trained with weight decay like every other parameter: their
  `learned_scaling` post-processor): z = eta * (s - delta * onehot(y)), shifted by its row
  max, L = -z_y + log(exp(0) + sum_{j != y} exp(z_j)), mean over the batch, over the classes
  seen so far. As in the authors' code the positive is "excluded" by setting its shifted
  logit to 0, so exp(max) stays in the denominator: L > 0 always and the paper's hinge
  [.]_+ can never act (their CIFAR config leaves `hinge_proxynca` off). The margin is applied
  to the positive only, as Eq. 7 says. The released code (config: delta = 0.6) subtracts it
  from every class instead (a bug the author confirmed, issue #59), where it cancels: the
  paper's numbers were made with no margin in effect, so `margin: 0` is shipped, which is the
  released code exactly. A positive-only margin with eta starting at 1 makes d L / d eta > 0
  while the features are still random (every s_c about equal), so eta is driven negative and
  the classifier learns reversed similarities (measured on split_digits with delta = 0.6, MLP
  and CNN, three protocols, two seeds: eta ended negative in 10 of 12 runs, 6 of them at
  0-0.3% class-IL accuracy); a warning says so when eta ends a task negative.
- POD-spatial (Eq. 2-4) on every stage's output map of the backbone (`feature_maps(x)[:-1]`)
  against the frozen previous model (eval mode): squared activations pooled over the width
  and over the height, the two concatenated, L2-normalised per sample, the L2 distance
  between teacher and student averaged over the batch, then over the maps (the authors'
  `pod(collapse_channels="spatial")`). A 2-D map (B, C) (an MLP's hidden layer) is a 1x1
  map: the term reduces to |a^2/|a^2| - b^2/|b^2|| per sample, the same formula.
- POD-flat on the final embedding (`feature_maps(x)[-1]`): mean over the batch of
  1 - cos(h_old, h) (their `embeddings_similarity`, a cosine embedding loss).
- Adaptive weights (their `scheduled_factor`): lambda_c * sqrt(N / T) and lambda_f *
  sqrt(N / T), N the classes seen so far (the new ones included) and T the new classes;
  lambda_c = 3, lambda_f = 1 for CIFAR-100.
- New classes' proxies (their `weight_generation: imprinted, multi_class_diff: kmeans`): at a
  task start (tasks >= 1), the L2-normalised features of each new class's training samples
  (the model before the task, eval mode, no augmentation) are clustered into K groups by
  k-means (here: `kmeans` below, seeded from the strategy's checkpointed generator; theirs is
  sklearn's KMeans, k-means++ seeding and 10 restarts), and the centres, scaled by the mean
  norm of the old classes' proxies, are the new proxies. The first task's proxies are random
  (their `basic`: normal with std 1/sqrt(features)).
- Old classes' proxies fixed while a task trains (their `groupwise_factors: old_weights: 0`):
  the head is one tensor here, so the rows outside the task's classes get no gradient and
  their stored values are written back after each step (exact for any optimizer).
- Gradients clamped element-wise to [-grad_clamp, grad_clamp] (5: a hook on every parameter
  in their `_train_task`), in the training steps and the fine-tuning.
- The classifier, NCA and POD run in float32 also under train.precision=bf16/fp16 (the
  backbone's maps are cast up); fp16's loss scaling goes through the Strategy's
  backward/unscale/optimizer_step, the clamp acting on the unscaled gradients.
- Exemplars: herding (class-balanced) after each task, from the model after the task; a task
  trains on its data joined with the exemplars. The paper keeps 20 per class; here
  `memory_size` is a fixed total shared by the classes seen so far.
- Class-balanced fine-tuning (their `finetuning_config`: undersampling, tuning classifier,
  20 epochs, lr 0.05 with the main lr 0.1) after each task >= 1: the proxies of every seen
  class (not the scale) are trained on the exemplar memory (the class-balanced set, the new
  classes' exemplars included) with the same NCA loss (POD has no gradient there), at
  train.lr * finetune_lr_factor, constant, with train.optimizer; the network stays in
  training mode as in their code (batch-norm statistics follow the memory batches). Their
  exemplars are rebuilt after this stage; the features do not change in it except through
  batch-norm statistics, so here the memory is built once, before it.
- Classification: the CNN's class similarities over the classes seen so far (their
  `eval_type: cnn`, the paper's CIFAR-100 numbers).

Protocol of the paper (CIFAR-100): ResNet-32 (`backbone=resnet32`), B-first-half (50 classes,
then 50 tasks of 1, 25 of 2, 10 of 5: `dataset.first_task_classes=50`), SGD lr 0.1, momentum
0.9, weight decay 5e-4, cosine schedule, 160 epochs, batch 128 (`train.*`), 20 exemplars per
class; their extra colour-jitter augmentation is not reproduced.

class_il only.
"""

from __future__ import annotations

import copy
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from cl_bench import CLBenchError
from cl_bench.data.stream import Task
from cl_bench.models.heads import CosineHead
from cl_bench.strategies.base import Batch
from cl_bench.strategies.buffer import ReplayStrategy

PROXY_INITS = ("kmeans", "random")


def adaptive_factor(seen_classes: int, new_classes: int) -> float:
    """sqrt(N / T): the authors' `scheduled_factor` multiplier of both POD weights."""
    return math.sqrt(seen_classes / new_classes)


def pod_spatial_loss(old_maps: Sequence[torch.Tensor], maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """POD-spatial (Eq. 2-4, the authors' `pod`), averaged over the maps (0 without maps)."""
    if len(maps) == 0:
        return torch.zeros(())
    total = 0.0
    for a, b in zip(old_maps, maps):
        if a.dim() == 2:  # (B, C): a 1x1 spatial map
            a, b = a[:, :, None, None], b[:, :, None, None]
        if a.dim() != 4:
            raise CLBenchError(f"POD-spatial needs (B, C, H, W) or (B, C) maps, got shape {tuple(a.shape)}")
        pooled = []
        for m in (a.detach().pow(2), b.pow(2)):
            # sum over the width (C x H values), sum over the height (C x W values)
            pooled.append(F.normalize(torch.cat([m.sum(3).flatten(1), m.sum(2).flatten(1)], dim=1), dim=1))
        total = total + (pooled[0] - pooled[1]).norm(dim=1).mean()
    return total / len(maps)


def pod_flat_loss(old_features: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """POD-flat: mean over the batch of 1 - cos(h_old, h) (the authors' cosine embedding loss)."""
    return (1 - F.cosine_similarity(features, old_features.detach(), dim=1)).mean()


def nca_loss(
    similarities: torch.Tensor,
    targets: torch.Tensor,
    scale: torch.Tensor | float,
    margin: float,
    classes: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Eq. 7 as the authors compute it (see the module docstring); `classes`: bool mask of
    the outputs that exist (the classes seen so far), the others left out of the sum."""
    onehot = F.one_hot(targets, similarities.shape[1]).to(similarities.dtype)
    z = scale * (similarities - margin * onehot)
    if classes is not None:
        z = z.masked_fill(~classes, float("-inf"))
    z = z - z.max(dim=1, keepdim=True).values  # not detached, as theirs
    positive = z.gather(1, targets[:, None]).squeeze(1)
    rest = z.scatter(1, targets[:, None], 0.0)  # the positive's term becomes exp(0)
    return (torch.logsumexp(rest, dim=1) - positive).mean()


def kmeans(points: torch.Tensor, k: int, generator: torch.Generator, restarts: int = 10, iterations: int = 100):
    """Lloyd's k-means, k-means++ seeding (Arthur & Vassilvitskii 2007), the best of `restarts`
    runs by inertia; draws from `generator` only, so the result is a function of its state.
    With at most k points, the points themselves (cycled to k centres)."""
    x = points.detach().double()
    n = len(x)
    if n <= k:
        return x[torch.arange(k, device=x.device) % n].to(points.dtype)
    best, best_inertia = None, math.inf
    for _ in range(restarts):
        centres = x[int(torch.randint(n, (1,), generator=generator))][None]
        while len(centres) < k:
            d2 = ((x[:, None] - centres[None]) ** 2).sum(-1).min(1).values.cpu()
            if d2.sum() > 0:
                i = int(torch.multinomial(d2 / d2.sum(), 1, generator=generator))
            else:
                i = int(torch.randint(n, (1,), generator=generator))
            centres = torch.cat([centres, x[i][None]])
        for _ in range(iterations):
            assign = ((x[:, None] - centres[None]) ** 2).sum(-1).argmin(1)
            counts = torch.bincount(assign, minlength=k)
            sums = torch.zeros_like(centres).index_add_(0, assign, x)
            moved = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centres)
            if torch.equal(moved, centres):
                break
            centres = moved
        inertia = float(((x[:, None] - centres[None]) ** 2).sum(-1).min(1).values.sum())
        if inertia < best_inertia:
            best, best_inertia = centres, inertia
    return best.to(points.dtype)


class PODNet(ReplayStrategy):
    supports_loss_scaling = True  # every training-step gradient goes through backward/unscale/optimizer_step
    scenarios = ("class_il",)

    def __init__(
        self,
        memory_size: int = 200,
        selection: str = "herding",
        proxies: int = 10,
        margin: float = 0.0,
        pod_spatial: float = 3.0,
        pod_flat: float = 1.0,
        proxy_init: str = "kmeans",
        finetune_epochs: int = 20,
        finetune_lr_factor: float = 0.5,
        grad_clamp: float = 5.0,
    ) -> None:
        """See the module docstring; keys as in the YAML."""
        for key, value in (("margin", margin), ("pod_spatial", pod_spatial), ("pod_flat", pod_flat), ("grad_clamp", grad_clamp)):
            if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise CLBenchError(f"strategy.{key} must be a finite number >= 0, got {value!r}")
        for key, value, least in (("proxies", proxies, 1), ("finetune_epochs", finetune_epochs, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise CLBenchError(f"strategy.{key} must be an integer >= {least}, got {value!r}")
        if isinstance(finetune_lr_factor, bool) or not (
            isinstance(finetune_lr_factor, (int, float)) and math.isfinite(finetune_lr_factor) and finetune_lr_factor > 0
        ):
            raise CLBenchError(f"strategy.finetune_lr_factor must be a positive number, got {finetune_lr_factor!r}")
        if proxy_init not in PROXY_INITS:
            raise CLBenchError(f"strategy.proxy_init must be one of {', '.join(PROXY_INITS)}, got {proxy_init!r}")
        super().__init__(memory_size, selection, "class", need_memory=True)
        self.proxies, self.margin, self.proxy_init = proxies, float(margin), proxy_init
        self.pod_spatial, self.pod_flat = float(pod_spatial), float(pod_flat)
        self.finetune_epochs, self.finetune_lr_factor, self.grad_clamp = finetune_epochs, float(finetune_lr_factor), float(grad_clamp)
        self.teacher = None
        self.factor = 1.0
        self._frozen_rows: Optional[torch.Tensor] = None

    def setup(self, model, stream, train_cfg, device) -> None:
        super().setup(model, stream, train_cfg, device)
        if not (hasattr(model, "feature_maps") and hasattr(model, "set_last_relu")):
            raise CLBenchError(f"strategy=podnet needs a backbone with feature_maps(x) and set_last_relu(on); {type(model).__name__} has not")
        model.set_last_relu(False)
        head = CosineHead(model.feature_dim, stream.num_outputs, proxies=self.proxies, init_scale=1.0, gamma=2.0)
        with torch.no_grad():  # the authors' first proxies: kaiming normal, linear gain
            head.weight.normal_(0.0, 1.0 / math.sqrt(model.feature_dim))
        model.head = head.to(device)

    # ----- the classifier ---------------------------------------------------------------
    def similarities(self, features: torch.Tensor) -> torch.Tensor:
        """The LSC's class similarities -|h/|h| - theta/|theta||^2 merged over proxies (N, outputs)."""
        return 2 * self.model.head.cosine(features) - 2

    def predict(self, x: torch.Tensor, task_id=None) -> torch.Tensor:
        return self.over_seen(self.similarities(self.model.features(x)))

    def rows(self, outputs) -> torch.Tensor:
        """The head rows (proxies) of the given classes."""
        outputs = torch.as_tensor(list(outputs), dtype=torch.long)
        return (outputs[:, None] * self.proxies + torch.arange(self.proxies)).flatten().to(self.device)

    # ----- hooks --------------------------------------------------------------------------
    def before_task(self, task: Task) -> None:
        self._seen = self.mark_seen(task)
        self.factor = adaptive_factor(int(self._seen.sum()), len(task.outputs))
        self.teacher = copy.deepcopy(self.model).eval().requires_grad_(False) if task.id > 0 else None
        if task.id > 0 and self.proxy_init == "kmeans":
            self.imprint(task)
        frozen = torch.ones(self.model.head.weight.shape[0], dtype=torch.bool, device=self.device)
        frozen[self.rows(task.outputs)] = False
        self._frozen_rows = frozen if frozen.any() else None
        super().before_task(task)

    @torch.no_grad()
    def imprint(self, task: Task) -> None:
        head = self.model.head
        old = [o for t in self.stream.tasks[: task.id] for o in t.outputs]
        scale = head.weight[self.rows(old)].norm(dim=1).mean()
        features = F.normalize(self.embed(task.train.x), dim=1)
        for c in task.outputs:
            centres = kmeans(features[task.train.y == c], self.proxies, self.generator)
            head.weight[self.rows([c])] = centres.to(head.weight.dtype) * scale

    def training_data(self, task: Task):
        return self.training_data_with_memory(task)

    def objective(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The training loss and its parts: NCA + factor * (lambda_c POD-spatial + lambda_f POD-flat)."""
        maps = self.model.feature_maps(x)
        old = None
        if self.teacher is not None and (self.pod_spatial > 0 or self.pod_flat > 0):
            with torch.no_grad():
                old = self.teacher.feature_maps(x)
        # the classifier and the losses in float32 also under train.precision=bf16/fp16: cosines,
        # their exponentials and distances between normalised vectors need more than 8 bits
        with torch.autocast(self.device.type, enabled=False):
            maps = [m.float() for m in maps]
            loss = nca_loss(self.similarities(maps[-1]), y, self.model.head.sigma, self.margin, self._seen)
            parts = {"nca": loss.detach()}
            if old is not None:
                old = [m.float() for m in old]
                spatial, flat = pod_spatial_loss(old[:-1], maps[:-1]).to(loss), pod_flat_loss(old[-1], maps[-1])
                loss = loss + self.factor * (self.pod_spatial * spatial + self.pod_flat * flat)
                parts.update(pod_spatial=spatial.detach(), pod_flat=flat.detach())
        return loss, parts

    def clamp(self, optimizer: torch.optim.Optimizer) -> None:
        """The authors' element-wise gradient clamp, on the true (unscaled) gradients."""
        if self.grad_clamp > 0:
            self.unscale(optimizer)
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.clamp_(-self.grad_clamp, self.grad_clamp)

    def train_step(self, batch: Batch) -> dict:
        loss, _ = self.objective(batch.x, batch.y)
        self.optimizer.zero_grad(set_to_none=True)
        self.backward(loss)
        self.clamp(self.optimizer)
        weight, frozen = self.model.head.weight, self._frozen_rows
        if frozen is None:
            self.optimizer_step()
        else:
            kept = weight.detach()[frozen].clone()
            if weight.grad is not None:
                weight.grad[frozen] = 0  # zero under any loss scale
            self.optimizer_step()
            with torch.no_grad():
                weight[frozen] = kept
        return {"loss": loss.detach()}

    def after_task(self, task: Task) -> None:
        self.teacher = None
        eta = float(self.model.head.sigma.detach())
        if eta <= 0:
            self.warn(
                f"the NCA scale eta (the head's sigma) is {eta:.3g} after task {task.id}: "
                "the classifier has learned reversed similarities; lower strategy.margin (0: the authors' code)"
            )
        self.remember(task)
        if task.id > 0 and self.finetune_epochs > 0:
            self.balanced_finetune()

    def balanced_finetune(self) -> None:
        data, head = self.memory.split(), self.model.head
        optimizer = self.make_optimizer([head.weight])
        for group in optimizer.param_groups:
            group["lr"] *= self.finetune_lr_factor
        scale = head.sigma.detach()
        self.model.train()
        for x, y in self.passes(data, self.finetune_epochs, self.train_cfg.batch_size, "balanced fine-tuning"):
            with torch.no_grad():
                features = self.model.features(x)
            loss = nca_loss(self.similarities(features), y, scale, self.margin, self._seen)
            optimizer.zero_grad(set_to_none=True)
            self.backward(loss)
            self.clamp(optimizer)
            self.optimizer_step(optimizer)

    def summary(self) -> dict:
        return {**super().summary(), "scale": float(self.model.head.sigma.detach()), "pod_factor": self.factor}
