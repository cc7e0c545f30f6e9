"""GDumb (Prabhu et al. 2020): the greedy class-balanced sampler (Alg. 1), no learning on the
stream, a network trained from scratch on the memory alone at every task end, the authors'
SGDR schedule and CutMix, masking only at inference, resume."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from cl_bench import CLBenchError
from cl_bench.runner import Runner
from cl_bench.strategies.gdumb import GDumb, GreedyBalancedMemory, sgdr_lr
from tests.conftest import compose_cfg, run, run_killed_and_resumed

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# tiny and cheap: 20 training samples per class, 2 passes over a 30-slot memory per task
SMALL = (
    "strategy=gdumb", "dataset.max_train_per_class=20", "strategy.memory_size=30", "strategy.epochs=2",
    "train.epochs=2", "checkpoint=false", "device.num_threads=1", "seed=0",
)
BATCH_NORM = ("backbone=reduced_resnet18", "backbone.nf=4")


def test_greedy_sampler_follows_algorithm_1():
    """Alg. 1 on a hand-made stream: fill while not full; then a sample enters only if its class
    holds fewer than k/|Y| samples, evicting one of the largest class."""
    memory, g = GreedyBalancedMemory(6), torch.Generator().manual_seed(0)
    x = torch.arange(20, dtype=torch.uint8).view(20, 1)

    def offer(label: int, n: int, start: int) -> dict:
        memory.add_greedy(x[start : start + n], torch.full((n,), label), 0, g)
        return memory.counts()

    assert offer(0, 6, 0) == {0: 6}
    assert offer(1, 5, 6) == {0: 3, 1: 3}  # quota 6/2 = 3: the 4th and 5th sample of class 1 are dropped
    assert offer(2, 4, 11) == {0: 2, 1: 2, 2: 2}  # quota 2
    assert len(memory) == 6 and memory.seen == 15
    stored = {int(v) for v in memory.x[:6, 0]}
    assert {11, 12} <= stored and not stored & {9, 10, 13, 14}  # the dropped samples were never stored
    assert memory.y[:6].tolist() == memory._labels


def test_memory_is_class_balanced_and_within_budget(monkeypatch):
    sizes, balance = [], []
    original_add, original_after = GreedyBalancedMemory.add_greedy, GDumb.after_task

    def add(self, *args):
        original_add(self, *args)
        sizes.append(len(self))
        assert len(self) <= self.capacity == 30 and len(self.x) <= 30
        assert self.y[: len(self)].tolist() == self._labels

    def after(self, task):
        counts = torch.bincount(self.memory.y[: len(self.memory)], minlength=self.stream.num_outputs)
        seen = [c for t in self.stream.tasks[: task.id + 1] for c in t.outputs]
        assert self.memory.seen == sum(len(t.train) for t in self.stream.tasks[: task.id + 1])  # each sample offered once
        if len(self.memory) == 30:
            present = counts[seen]
            balance.append(int(present.max() - present.min()))
            assert present.max() - present.min() <= 1, counts.tolist()
        assert counts.sum() == counts[seen].sum()  # nothing but seen classes
        original_after(self, task)

    monkeypatch.setattr(GreedyBalancedMemory, "add_greedy", add)
    monkeypatch.setattr(GDumb, "after_task", after)
    s = run_and_keep(*SMALL)[0]
    assert sizes and max(sizes) == 30 and len(balance) == 5  # full from task 0 on (40 samples offered to 30 slots)
    assert s["train_log"][-1]["strategy"]["exemplars"] == 30


def run_and_keep(*overrides, folder=None):
    import tempfile
    from pathlib import Path

    runner = Runner(compose_cfg(*overrides), Path(folder or tempfile.mkdtemp()) / "run")
    return runner.run(), runner


def test_no_gradient_step_and_no_forward_on_the_stream(monkeypatch):
    """The stream's steps only store: weights, batch-norm statistics and gradients untouched,
    no optimizer exists."""
    original, checked = GDumb.train_step, []

    def step(self, batch):
        before = {k: v.clone() for k, v in self.model.state_dict().items()}
        out = original(self, batch)
        assert self.optimizer is None
        assert all(torch.equal(before[k], v) for k, v in self.model.state_dict().items())
        assert all(p.grad is None for p in self.model.parameters())
        checked.append(float(out["loss"]))
        return out

    monkeypatch.setattr(GDumb, "train_step", step)
    run_and_keep(*SMALL, *BATCH_NORM)
    assert checked and set(checked) == {0.0}


def test_final_network_depends_on_the_memory_alone(monkeypatch):
    """Retrain from the recorded final memory and generator state in a fresh strategy whose
    network was scrambled and whose stream was wiped: the weights (and batch-norm statistics)
    equal the run's bit for bit. So the learner starts from scratch and reads only the memory."""
    original, recorded = GDumb.fit_memory, {}

    def fit(self):
        recorded.update(memory=self.memory.state_dict(), generator=self.generator.get_state())
        recorded["memory"] = {k: v.clone() if torch.is_tensor(v) else v for k, v in recorded["memory"].items()}
        original(self)

    monkeypatch.setattr(GDumb, "fit_memory", fit)
    _, runner = run_and_keep(*SMALL, *BATCH_NORM)
    final = {k: v.clone() for k, v in runner.strategy.model.state_dict().items()}
    monkeypatch.setattr(GDumb, "fit_memory", original)

    fresh = Runner(compose_cfg(*SMALL, *BATCH_NORM), runner.output_dir.parent / "fresh")
    fresh.build()
    s = fresh.strategy
    noise = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for t in s.model.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=noise))
    s.stream = dataclasses.replace(s.stream, tasks=[])  # nothing outside the memory is left to read
    s.memory.load_state_dict(recorded["memory"])
    s.generator.set_state(recorded["generator"])
    s.fit_memory()
    retrained = s.model.state_dict()
    assert final.keys() == retrained.keys()
    assert all(torch.equal(final[k], retrained[k]) for k in final)


def test_task_il_masks_only_at_inference(tmp_path):
    """Memory and training do not depend on the scenario (the paper trains one classifier over
    all classes and masks at test time), so the task-IL matrix is class-IL's task-aware one."""
    class_il = run(tmp_path, *SMALL, "scenario=class_il", name="cil")
    task_il = run(tmp_path, *SMALL, "scenario=task_il", name="til")
    assert np.array_equal(np.asarray(task_il["accuracy_matrix"]), np.asarray(class_il["accuracy_matrix_task_aware"]))
    R = np.asarray(class_il["accuracy_matrix"])
    assert np.isfinite(R).all()
    domain = run(tmp_path, *SMALL, "scenario=domain_il", name="dil")
    assert np.isfinite(np.asarray(domain["accuracy_matrix"])).all()


def test_class_il_predicts_only_classes_in_memory(tmp_path):
    _, runner = run_and_keep(*SMALL, folder=tmp_path)
    s = runner.strategy
    x = s.stream.transform(s.stream.tasks[0].test.x[:8])
    with torch.no_grad():
        scores = s.predict(x)
    assert torch.isfinite(scores).all()  # all classes are in memory at the end
    s._known[s.stream.tasks[-1].outputs] = False
    with torch.no_grad():
        masked = s.predict(x)
    assert torch.isinf(masked[:, s.stream.tasks[-1].outputs]).all()


def test_sgdr_schedule_matches_the_authors_loop():
    """src/main.py: pass 0 at lr/10, pass 1 at lr, then CosineAnnealingWarmRestarts(T_0=1,
    T_mult=2, eta_min) stepped before each later pass."""
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([p], lr=0.05)
    sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=1, T_mult=2, eta_min=0.0005)
    for epoch in range(40):
        if epoch == 0:
            opt.param_groups[0]["lr"] = 0.005
        elif epoch == 1:
            opt.param_groups[0]["lr"] = 0.05
        else:
            sched.step()
        assert sgdr_lr(epoch, 0.05, 0.0005) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12)


def test_cutmix_pastes_one_box_and_mixes_by_its_area():
    s = GDumb(cutmix=True)
    s.generator = torch.Generator().manual_seed(0)
    x = torch.arange(16, dtype=torch.float32).view(16, 1, 1, 1).expand(16, 1, 8, 8).contiguous()
    y = torch.arange(16)
    for _ in range(20):
        mixed, y_b, lam = s.cut_and_mix(x, y)
        own = (mixed == x).float().mean(dim=(1, 2, 3))
        from_partner = (mixed == y_b.view(16, 1, 1, 1).float()).float().mean(dim=(1, 2, 3))
        moved = y_b != y
        assert torch.allclose(own[moved], torch.full_like(own[moved], lam))
        assert torch.allclose(from_partner[moved], torch.full_like(own[moved], 1 - lam))


def test_cutmix_run_is_finite(tmp_path):
    s = run(tmp_path, *SMALL, "strategy.cutmix=true", "strategy.cutmix_prob=1.0")
    assert np.isfinite(np.asarray(s["accuracy_matrix"])).all()


def test_resume_after_kill_gives_the_same_matrix(tmp_path, monkeypatch):
    overrides = [o for o in SMALL if o != "checkpoint=false"]
    reference, resumed = run_killed_and_resumed(tmp_path, monkeypatch, overrides, kill_at_task=2)
    assert np.array_equal(np.asarray(resumed["accuracy_matrix"]), np.asarray(reference["accuracy_matrix"]))
    assert resumed["strategy_info"] == reference["strategy_info"]


@pytest.mark.parametrize(
    "override,key",
    [
        ("strategy.epochs=0", "strategy.epochs"),
        ("strategy.min_lr=1.0", "strategy.min_lr"),
        ("strategy.clip=0", "strategy.clip"),
        ("strategy.cutmix_prob=2", "strategy.cutmix_prob"),
        ("strategy.memory_size=5", "strategy.memory_size"),
    ],
)
def test_bad_values_are_refused_naming_the_key(override, key, tmp_path):
    with pytest.raises(CLBenchError, match=key.replace(".", r"\.")) as err:
        run(tmp_path, *SMALL, override)
    assert "\n" not in str(err.value).strip()
