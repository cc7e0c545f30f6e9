"""WA (Zhao et al. 2020): weight aligning (Eq. 8-9), weight clipping, the (1 - lambda) CE +
lambda KD loss with a frozen teacher, the reduction to finetune, resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cl_bench import CLBenchError
from cl_bench.runner import Runner
from cl_bench.strategies.base import Batch
from cl_bench.strategies.wa import WA
from tests.conftest import compose_cfg, run, run_killed_and_resumed, spy_frozen_teacher

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = (
    "strategy=wa", "dataset.max_train_per_class=20", "train.epochs=2", "checkpoint=false",
    "device.num_threads=1", "seed=0",
)
BATCH_NORM = ("backbone=reduced_resnet18", "backbone.nf=4")
# protection off: no aligning, no distillation, no clipping, no memory
OFF = ("strategy.align=false", "strategy.kd_lambda=0", "strategy.clip_weights=false", "strategy.memory_size=0")


def test_aligning_equalises_mean_norms_and_leaves_old_classes_alone(tmp_path, monkeypatch):
    original, checked = WA.align_weights, []

    def align(self, old, new):
        head = self.model.head
        before_w, before_b = head.weight.detach().clone(), head.bias.detach().clone()
        gamma = original(self, old, new)
        after_w = head.weight.detach()
        assert torch.equal(after_w[old], before_w[old])  # old rows untouched
        assert torch.equal(head.bias.detach(), before_b)  # biases untouched
        rest = [c for c in range(len(after_w)) if c not in set(old) | set(new)]
        assert torch.equal(after_w[rest], before_w[rest])  # classes not seen yet untouched
        torch.testing.assert_close(after_w[new], before_w[new] * gamma, rtol=1e-6, atol=0)
        old_mean, new_mean = after_w[old].norm(dim=1).mean(), after_w[new].norm(dim=1).mean()
        torch.testing.assert_close(new_mean, old_mean, rtol=1e-5, atol=0)
        assert abs(gamma - 1) > 1e-3  # the new classes' norms really differed
        checked.append(gamma)
        return gamma

    monkeypatch.setattr(WA, "align_weights", align)
    s = run(tmp_path, *SMALL)
    assert len(checked) == 4 and s["strategy_info"]["gamma"] == pytest.approx(checked)


def test_weights_stay_non_negative_after_every_step(monkeypatch, tmp_path):
    original, mins = WA.train_step, []

    def step(self, batch):
        out = original(self, batch)
        mins.append(float(self.model.head.weight.detach().min()))
        return out

    monkeypatch.setattr(WA, "train_step", step)
    run(tmp_path, *SMALL)
    assert mins and min(mins) >= 0.0


def test_teacher_is_frozen_in_eval_mode_with_batch_norm(tmp_path, monkeypatch):
    checked = spy_frozen_teacher(monkeypatch, WA, "teacher")
    Runner(compose_cfg(*SMALL, *BATCH_NORM), tmp_path / "run").run()
    assert checked


def test_loss_is_one_minus_lambda_ce_plus_lambda_kd_without_t_squared(tmp_path):
    """At the start of task t the student equals the teacher, so with lambda = C_old / C_seen the
    loss is (1 - lambda) CE(seen classes) + lambda H(softmax(old logits / 2)), in closed form."""
    runner = Runner(compose_cfg(*SMALL), tmp_path)
    runner.build()
    s, stream = runner.strategy, runner.stream
    lambdas = []
    for task in stream.tasks[:3]:
        s.begin_task(task)
        s.before_task(task)
        lambdas.append(s._lambda)
        if task.id == 2:
            break
        s.after_task(task)
    assert lambdas == [0.0, 0.5, pytest.approx(4 / 6)]
    task = stream.tasks[2]
    s.set_training(False)
    s.clip_weights = False
    x, y = stream.transform(task.train.x[:16]), task.train.y[:16]
    with torch.no_grad():
        logits = s.model(x)
    old, seen = s._old, s._seen
    ce = F.cross_entropy(logits.masked_fill(~seen, float("-inf")), y)
    p = F.softmax(logits[:, old] / 2.0, dim=1)
    entropy = -(p * p.log()).sum(1).mean()
    lam = 4 / 6
    loss = s.train_step(Batch(x, y, task.train.x[:16], task))["loss"]
    assert float(loss) == pytest.approx(float((1 - lam) * ce + lam * entropy), rel=1e-5)


@pytest.mark.parametrize(
    "protocol",
    [("train.optimizer=sgd", "train.momentum=0.9", "train.weight_decay=5e-4", "backbone.dropout=0.5"),
     ("train.optimizer=adamw", "train.weight_decay=0.01", *BATCH_NORM)],
    ids=["sgd-momentum-wd-dropout", "adamw-batchnorm"],
)
def test_protection_off_is_finetune_over_the_seen_classes(protocol, tmp_path):
    """align=false, kd_lambda=0, clip_weights=false, memory_size=0: the cross-entropy over the
    classes seen so far on the task's data alone, i.e. finetune with train.active_classes=true,
    bit for bit (matrix and weights)."""
    common = (*SMALL[1:], "train.active_classes=true", *protocol)
    off = Runner(compose_cfg("strategy=wa", *OFF, *common), tmp_path / "off")
    finetune = Runner(compose_cfg("strategy=finetune", *common), tmp_path / "finetune")
    a, b = off.run(), finetune.run()
    assert np.array_equal(np.asarray(a["accuracy_matrix"]), np.asarray(b["accuracy_matrix"]))
    theirs = dict(finetune.strategy.model.named_parameters())
    assert all(torch.equal(p, theirs[n]) for n, p in off.strategy.model.named_parameters())


def test_protection_on_beats_finetune(tmp_path):
    on = run(tmp_path, *SMALL, name="on")["metrics"]["acc"]
    off = run(tmp_path, *SMALL, *OFF, name="off")["metrics"]["acc"]
    assert on > off + 0.2


def test_resume_after_kill_gives_the_same_matrix(tmp_path, monkeypatch):
    overrides = [o for o in SMALL if o != "checkpoint=false"]
    reference, resumed = run_killed_and_resumed(tmp_path, monkeypatch, overrides, kill_at_task=2)
    assert np.array_equal(np.asarray(resumed["accuracy_matrix"]), np.asarray(reference["accuracy_matrix"]))
    assert resumed["strategy_info"] == reference["strategy_info"]


@pytest.mark.parametrize(
    "override,key",
    [("strategy.temperature=0", "strategy.temperature"), ("strategy.kd_lambda=2", "strategy.kd_lambda"),
     ("strategy.memory_size=-1", "strategy.memory_size")],
)
def test_bad_values_are_refused_naming_the_key(override, key, tmp_path):
    with pytest.raises(CLBenchError, match=key.replace(".", r"\.")) as err:
        run(tmp_path, *SMALL, override)
    assert "\n" not in str(err.value).strip()


def test_refuses_task_il(tmp_path):
    with pytest.raises(CLBenchError, match="does not support scenario=task_il"):
        run(tmp_path, *SMALL, "scenario=task_il")
