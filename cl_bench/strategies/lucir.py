"""LUCIR (Hou, Pan, Loy, Wang, Lin, CVPR 2019, "Learning a Unified Classifier Incrementally
via Rebalancing"). Paper protocol and the authors' code (github hshustc/CVPR19_Incremental_Learning,
`class_incremental_cosine_cifar100.py`, `incremental_train_and_eval_MR_LF.py`, `modified_linear.py`):

- Cosine normalisation (Eq. 4): the linear head is replaced by the shared `CosineHead`
  (one proxy per class, learnable scale sigma initialised at 1, trained with weight decay
  like every other parameter, as in the authors' optimizer), scores sigma * <f/|f|, w/|w|>,
  softmax cross-entropy over the classes seen so far (the authors' head grows each task; the
  head here is allocated in full, so the unseen classes' outputs get -inf, in training and
  in `predict`). The last ReLU of the backbone is removed (`set_last_relu(False)`: the
  authors' `modified_resnet_cifar` drops it so features can be negative).
- Weight imprinting (authors' `--imprint_weights`): at the start of each later task, each new
  class's weight is the L2-normalised mean of the L2-normalised features of its training
  samples (model before the task, eval mode, no augmentation), scaled to the mean norm of
  the old classes' weights, as in the authors' code. The first task's head is random.
- Old-class weights fixed: the authors put the old classes' weights (`fc.fc1`) in a param
  group with lr 0 and weight decay 0 whenever the less-forget constraint is on. The head
  here is one tensor (a param group cannot hold part of it), so the same effect is made
  exactly: the old rows' gradients are zeroed before each step and their stored values
  written back after it (no optimizer, momentum or decoupled decay can move them).
- Less-forget constraint (Eq. 6): L_G = 1 - <f*(x)/|f*(x)|, f(x)/|f(x)|> between the frozen
  previous model's features (teacher, eval mode) and the current ones, averaged over the
  batch (all samples, new and exemplars: the authors' CosineEmbeddingLoss), weighted by
  lambda = lambda_base * sqrt(|C_old| / |C_new|) (Sec. 3.2; lambda_base = 5 on CIFAR-100).
- Inter-class separation (Eq. 7): for each old-class sample in the batch, a margin ranking
  loss sum_k max(0, m - <theta(x), f(x)> + <theta_k, f(x)>) on the unscaled cosines against
  the K highest-scoring new classes (K = 2, m = 0.5), averaged over (old samples x K) and
  weighted by `margin_weight` (the authors' lw_mr = 1); zero when the batch has no exemplars.
  A task with fewer than K new classes (e.g. one class per task) uses all of them (with a
  warning; the authors' top-K would fail there).
- Exemplars (Sec. 3.4): herding on normalised features, class-balanced; the training set of
  a task is its data joined with all exemplars. The paper keeps 20 per class (memory grows);
  here `memory_size` is a fixed total shared by the classes seen so far.
- Class-balanced fine-tuning (Sec. 3.4, `cbf`; the authors' `cbf_class_incremental_cosine_imagenet.py`,
  their default `ft_flag=2`): after the task and the exemplar update, the head's class weights
  (old and new; sigma fixed) are fine-tuned on the class-balanced exemplar set with the
  feature extractor frozen (batch norm in eval mode) for `cbf_epochs` (20) at `cbf_lr` (0.01),
  x0.1 after half of them (their milestone 10 of 20), with the same loss (the less-forget term
  has no gradient there). Off by default: the authors' CIFAR-100 commands (`run.sh`) do not use it.
- Classification: the CNN's scaled cosine scores (`classifier: cnn`, the paper's main metric),
  or the nearest mean of exemplars (`classifier: nme`, iCaRL's rule; `ICaRL.exemplar_means` and
  `ICaRL.predict` are reused; the authors also average flipped exemplars, not done here).

Protocol of the paper (CIFAR-100): ResNet-32, B-first-half (50 classes first, then 10/5/2 per
task: `dataset.first_task_classes`), SGD lr 0.1, momentum 0.9, weight decay 5e-4, 160 epochs,
multistep milestones 80/120, gamma 0.1, batch 128 (`train.*`), 20 exemplars per class.

The cosine head and LUCIR's losses run in float32 also under train.precision=bf16/fp16 (cosines,
the 0.5 margin between them and 1 - cos near 0 need more than 8 significant bits). With
`classifier: cnn`, `memory_size: 0` is allowed (no replay); with `lambda_base: 0`,
`margin_weight: 0`, `cbf: false` and no memory, LUCIR is finetune with the cosine head and
imprinting, bit for bit (tests/test_lucir.py). class_il only.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F

from cl_bench import CLBenchError
from cl_bench.data.stream import Split, Task
from cl_bench.models.heads import CosineHead
from cl_bench.strategies.base import Batch
from cl_bench.strategies.buffer import ReplayStrategy
from cl_bench.strategies.icarl import ICaRL

CLASSIFIERS = ("cnn", "nme")


def adaptive_lambda(lambda_base: float, n_old: int, n_new: int) -> float:
    """The less-forget weight lambda_base * sqrt(|C_old| / |C_new|) (Sec. 3.2)."""
    return lambda_base * math.sqrt(n_old / n_new)


def less_forget_loss(features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """Eq. 6, mean over the batch of 1 - cos(f*(x), f(x))."""
    return (1 - F.cosine_similarity(features, teacher_features.detach(), dim=1)).mean()


def margin_ranking_loss(
    cosines: torch.Tensor, y: torch.Tensor, old: torch.Tensor, new: torch.Tensor, k: int, margin: float
) -> torch.Tensor:
    """Eq. 7 on unscaled cosines (N, outputs): for samples whose label is an old class
    (`old`: bool mask over outputs), max(0, margin - cos_gt + cos_neg) for each of the top-k
    cosines among the `new` outputs, averaged over (old samples x k); 0 without old samples."""
    hard = old[y].unsqueeze(1)
    gt = cosines.gather(1, y.unsqueeze(1))
    negatives = cosines[:, new].topk(k, dim=1).values
    per_pair = F.relu(margin - gt + negatives) * hard
    return per_pair.sum() / (hard.sum() * k).clamp_min(1)


class LUCIR(ReplayStrategy):
    supports_loss_scaling = True  # every training-step gradient goes through backward/optimizer_step
    scenarios = ("class_il",)

    def __init__(
        self,
        memory_size: int = 200,
        selection: str = "herding",
        lambda_base: float = 5.0,
        margin: float = 0.5,
        hard_negatives: int = 2,
        margin_weight: float = 1.0,
        imprint: bool = True,
        cbf: bool = False,
        cbf_epochs: int = 20,
        cbf_lr: float = 0.01,
        classifier: str = "cnn",
    ) -> None:
        """See the module docstring; keys as in the YAML."""
        for key, value in (("lambda_base", lambda_base), ("margin", margin), ("margin_weight", margin_weight)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise CLBenchError(f"strategy.{key} must be a finite number >= 0, got {value!r}")
        if isinstance(hard_negatives, bool) or not isinstance(hard_negatives, int) or hard_negatives < 1:
            raise CLBenchError(f"strategy.hard_negatives (K) must be an integer >= 1, got {hard_negatives!r}")
        if isinstance(cbf_epochs, bool) or not isinstance(cbf_epochs, int) or cbf_epochs < 1:
            raise CLBenchError(f"strategy.cbf_epochs must be an integer >= 1, got {cbf_epochs!r}")
        if not (isinstance(cbf_lr, (int, float)) and math.isfinite(cbf_lr) and cbf_lr > 0):
            raise CLBenchError(f"strategy.cbf_lr must be a positive number, got {cbf_lr!r}")
        if classifier not in CLASSIFIERS:
            raise CLBenchError(f"strategy.classifier must be one of {', '.join(CLASSIFIERS)}, got {classifier!r}")
        if cbf and memory_size < 1:
            raise CLBenchError(f"strategy.memory_size must be positive for class-balanced fine-tuning (strategy.cbf=true), got {memory_size}")
        # the CNN classifier runs without exemplars (memory_size=0: no replay); NME needs them
        super().__init__(memory_size, selection, "class", need_memory=classifier == "nme" or memory_size > 0)
        self.lambda_base, self.margin, self.hard_negatives = float(lambda_base), float(margin), hard_negatives
        self.margin_weight, self.imprint, self.cbf = float(margin_weight), bool(imprint), bool(cbf)
        self.cbf_epochs, self.cbf_lr, self.classifier = cbf_epochs, float(cbf_lr), classifier
        self.teacher = None
        self.class_means = None
        self.lam = 0.0

    def setup(self, model, stream, train_cfg, device) -> None:
        super().setup(model, stream, train_cfg, device)
        fewest = min((len(t.outputs) for t in stream.tasks[1:]), default=self.hard_negatives)
        if self.margin_weight > 0 and self.hard_negatives > fewest:
            self.warn(
                f"strategy.hard_negatives={self.hard_negatives} is more than the {fewest} new classes of some task; "
                "there the margin ranking loss takes all of the new classes as negatives"
            )
        model.set_last_relu(False)
        model.head = CosineHead(model.feature_dim, stream.num_outputs).to(device)
        self._fixed = None  # (old outputs, their weights) while they are held fixed

    def before_task(self, task: Task) -> None:
        self.mark_seen(task)
        old = self.seen_outputs(task, include_current=False)
        self._old = torch.zeros(self.stream.num_outputs, dtype=torch.bool, device=self.device)
        self._old[old] = True
        self._has_old = bool(old)
        self._new = torch.tensor(task.outputs, dtype=torch.long, device=self.device)
        self.teacher, self._fixed, self.lam = None, None, 0.0
        if old:
            if self.imprint:
                imprint_weights(self.model.head, self.embed(task.train.x), task.train.y, task.outputs, old)
            self.lam = adaptive_lambda(self.lambda_base, len(old), len(task.outputs))
            if self.lam > 0:  # the authors fix the old classes' weights with the less-forget constraint
                self.teacher = copy.deepcopy(self.model).eval().requires_grad_(False)
                index = torch.tensor(old, dtype=torch.long, device=self.device)
                self._fixed = (index, self.model.head.weight.detach()[index].clone())
        super().before_task(task)

    def training_data(self, task: Task) -> Split:
        return self.training_data_with_memory(task)

    def lucir_loss(self, features: torch.Tensor, y: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        teacher_features = None
        if self.teacher is not None and self.lam > 0 and x is not None:
            with torch.no_grad():
                teacher_features = self.teacher.features(x)
        # the head and the losses in float32 also under train.precision=bf16: cosines, the
        # 0.5 margin between them and 1 - cos near 0 need more than bfloat16's 8 bits
        with torch.autocast(self.device.type, enabled=False):
            features = features.float()
            cosines = self.model.head.cosine(features)
            loss = F.cross_entropy(self.over_seen(sigma * cosines), y)
            if teacher_features is not None:
                loss = loss + self.lam * less_forget_loss(features, teacher_features.float())
            if self.margin_weight > 0 and self._has_old:
                k = min(self.hard_negatives, len(self._new))
                margin = margin_ranking_loss(cosines, y, self._old, self._new, k, self.margin)
                loss = loss + self.margin_weight * margin
        return loss

    def train_step(self, batch: Batch) -> dict:
        head = self.model.head
        loss = self.lucir_loss(self.model.features(batch.x), batch.y, batch.x, head.sigma)
        self.optimizer.zero_grad(set_to_none=True)
        self.backward(loss)
        if self._fixed is not None:
            index, weights = self._fixed
            if head.weight.grad is not None:
                head.weight.grad[index] = 0  # zero under any loss scale
        self.optimizer_step()
        if self._fixed is not None:
            with torch.no_grad():
                head.weight[index] = weights
        return {"loss": loss.detach()}

    def after_task(self, task: Task) -> None:
        self.teacher, self._fixed = None, None
        self.remember(task)
        if self.cbf and task.id > 0:
            self.balanced_finetune()
        if self.classifier == "nme":
            self.class_means = ICaRL.exemplar_means(self)

    def balanced_finetune(self) -> None:
        """The authors' CBF (ft_flag=2): class weights only, feature extractor frozen, on the exemplars."""
        data, head = self.memory.split(), self.model.head
        optimizer = self.make_optimizer([{"params": [head.weight], "lr": self.cbf_lr}])
        sigma = head.sigma.detach()
        self.model.eval()  # frozen feature extractor, batch norm included (the authors' fix_bn)

        def schedule(epoch: int) -> None:
            for group in optimizer.param_groups:
                group["lr"] = self.cbf_lr * (0.1 if epoch >= self.cbf_epochs // 2 else 1.0)

        for x, y in self.passes(data, self.cbf_epochs, self.train_cfg.batch_size, "class-balanced fine-tuning", schedule):
            with torch.no_grad():
                features = self.model.features(x)
            loss = self.lucir_loss(features, y, None, sigma)
            optimizer.zero_grad(set_to_none=True)
            self.backward(loss)
            self.optimizer_step(optimizer)
        self.model.train()

    def predict(self, x: torch.Tensor, task_id=None) -> torch.Tensor:
        if self.classifier == "nme" and self.class_means is not None:
            return ICaRL.predict(self, x)
        return self.over_seen(self.model(x))

    def validation_scores(self, x: torch.Tensor, task_id=None) -> torch.Tensor:
        """The cosine classifier's scores (the new classes have no exemplar mean during a task)."""
        return self.over_seen(self.model(x))

    def summary(self) -> dict:
        return {**super().summary(), "sigma": float(self.model.head.sigma.detach()), "less_forget_lambda": self.lam}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "class_means": self.class_means}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.class_means = state["class_means"]


@torch.no_grad()
def imprint_weights(head: CosineHead, features: torch.Tensor, labels: torch.Tensor, new, old) -> None:
    """The authors' imprinting: row c (c in `new`) <- normalise(mean_i normalise(f_i)) over
    class c's samples, times the mean norm of the `old` rows."""
    scale = head.weight[old].norm(dim=1).mean()
    normalised = F.normalize(features, dim=1)
    for c in new:
        head.weight[c] = F.normalize(normalised[labels == c].mean(0), dim=0) * scale
