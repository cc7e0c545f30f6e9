"""PODNet (Douillard et al., ECCV 2020): the pooled-outputs distillation terms, the NCA loss
and the local similarity classifier against direct formulas and exact invariants; the
adaptive weights, frozen old proxies, k-means imprinting and the single-task reduction to
plain NCA training through the real Runner with the shipped defaults; resume; refusals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cl_bench import CLBenchError
from cl_bench.runner import Runner
from cl_bench.strategies.podnet import (
    PODNet,
    adaptive_factor,
    kmeans,
    nca_loss,
    pod_flat_loss,
    pod_spatial_loss,
)
from tests.conftest import compose_cfg, run_killed_and_resumed, spy_frozen_teacher

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = ("strategy=podnet", "train.epochs=1", "dataset.max_train_per_class=20", "checkpoint=false", "seed=0")
B_HALF = ("dataset.first_task_classes=5", "dataset.num_tasks=6")  # 5 classes, then 5 tasks of 1


def _grad(loss_fn, *tensors):
    leaves = [t.clone().requires_grad_(True) for t in tensors]
    loss = loss_fn(*leaves)
    return loss, torch.autograd.grad(loss, leaves)


# ----- POD-spatial, POD-flat ----------------------------------------------------------------


def test_pod_spatial_is_zero_for_identical_maps_and_equals_the_direct_formula():
    g = torch.Generator().manual_seed(0)
    old = [torch.randn(3, 2, 3, 4, generator=g, dtype=torch.float64), torch.randn(3, 5, 2, 2, generator=g, dtype=torch.float64),
           torch.randn(3, 7, generator=g, dtype=torch.float64)]
    new = [torch.randn(m.shape, generator=g, dtype=torch.float64) for m in old]

    def direct(a, b):  # Eq. 2-4 as the authors compute it, one sample at a time with loops
        per_map = []
        for m_a, m_b in zip(a, b):
            if m_a.dim() == 2:  # (B, C) is a 1x1 map
                m_a, m_b = m_a[:, :, None, None], m_b[:, :, None, None]
            dists = []
            for i in range(len(m_a)):
                vecs = []
                for m in (m_a[i] ** 2, m_b[i] ** 2):
                    C, H, W = m.shape
                    width = [sum(m[c, h, w] for w in range(W)) for c in range(C) for h in range(H)]
                    height = [sum(m[c, h, w] for h in range(H)) for c in range(C) for w in range(W)]
                    v = torch.stack(width + height)
                    vecs.append(v / v.norm())
                dists.append((vecs[0] - vecs[1]).norm())
            per_map.append(torch.stack(dists).mean())
        return torch.stack(per_map).mean()

    assert torch.allclose(pod_spatial_loss(old, new), direct(old, new), rtol=0, atol=1e-12)
    # a (B, C) map: |a^2/|a^2| - b^2/|b^2||, averaged over the batch
    a, b = old[2], new[2]
    flat = (F.normalize(a**2, dim=1) - F.normalize(b**2, dim=1)).norm(dim=1).mean()
    assert torch.allclose(pod_spatial_loss([a], [b]), flat, rtol=0, atol=1e-12)
    # identical maps: exactly zero, with a finite (zero) gradient
    loss, grads = _grad(lambda *m: pod_spatial_loss(old, list(m)), *old)
    assert loss.item() == 0.0
    assert all(torch.isfinite(gr).all() and gr.abs().max() == 0 for gr in grads)
    # normalised: invariant to a positive rescaling of each student map, so <dL/db, b> = 0
    _, grads = _grad(lambda *m: pod_spatial_loss(old, list(m)), *new)
    for gr, m in zip(grads, new):
        assert abs((gr * m).sum().item()) < 1e-12
        assert gr.abs().max() > 1e-3
    # the teacher gets no gradient
    teacher = [m.clone().requires_grad_(True) for m in old]
    pod_spatial_loss(teacher, [m.clone().requires_grad_(True) for m in new]).backward()
    assert all(t.grad is None for t in teacher)


def test_pod_flat_is_zero_for_identical_embeddings_and_equals_one_minus_cosine():
    g = torch.Generator().manual_seed(1)
    h_old, h = torch.randn(4, 6, generator=g, dtype=torch.float64), torch.randn(4, 6, generator=g, dtype=torch.float64)
    direct = torch.stack([1 - (h_old[i] @ h[i]) / (h_old[i].norm() * h[i].norm()) for i in range(4)]).mean()
    assert torch.allclose(pod_flat_loss(h_old, h), direct, rtol=0, atol=1e-12)
    assert pod_flat_loss(h, h).item() == pytest.approx(0.0, abs=1e-15)
    _, (grad,) = _grad(lambda x: pod_flat_loss(h_old, x), h)
    assert (grad * h).sum(1).abs().max() < 1e-12  # only the direction of h matters
    assert grad.abs().max() > 1e-3


# ----- NCA, LSC ----------------------------------------------------------------------------------


def test_nca_loss_equals_the_authors_formula_and_is_shift_invariant():
    g = torch.Generator().manual_seed(2)
    s = -4 * torch.rand(5, 6, generator=g, dtype=torch.float64)  # -|h - theta|^2 in [-4, 0]
    y = torch.tensor([0, 3, 5, 1, 3])
    seen = torch.tensor([True, True, True, True, False, True])
    eta, delta = 2.5, 0.6

    def direct(s):  # -eta (s_y - delta) + log(exp(M) + sum_{j != y, seen} exp(eta s_j)), M the max of the logits
        losses = []
        for i in range(len(s)):
            z = [eta * (s[i, j] - (delta if j == y[i] else 0.0)) for j in range(6) if seen[j]]
            cols = [j for j in range(6) if seen[j]]
            big = max(z)
            rest = sum(math.exp(zj) for zj, j in zip(z, cols) if j != y[i])
            losses.append(-z[cols.index(int(y[i]))] + math.log(math.exp(big) + rest))
        return float(sum(losses) / len(losses))

    loss, (grad,) = _grad(lambda x: nca_loss(x, y, eta, delta, seen), s)
    assert loss.item() == pytest.approx(direct(s), abs=1e-12)
    assert loss.item() > 0  # exp(M) stays in the denominator: the paper's hinge can never act
    assert grad[:, 4].abs().max() == 0  # a class not seen yet gets no gradient
    assert grad.sum(1).abs().max() < 1e-12  # invariant to adding a constant to every similarity
    assert nca_loss(s + 0.37, y, eta, delta, seen).item() == pytest.approx(loss.item(), abs=1e-12)
    # the released code subtracts delta from every class: that is the same loss as delta = 0
    assert nca_loss(s - delta, y, eta, 0.0, seen).item() == pytest.approx(nca_loss(s, y, eta, 0.0, seen).item(), abs=1e-12)
    assert nca_loss(s, y, eta, 0.0, seen).item() < loss.item()  # the margin on the positive does act


def test_lsc_merges_ten_proxies_per_class_by_softmax_on_the_authors_similarity(tmp_path):
    runner = Runner(compose_cfg(*SMALL), tmp_path)
    runner.build()
    s = runner.strategy
    head = s.model.head
    assert head.proxies == 10 and head.weight.shape == (10 * runner.stream.num_outputs, s.model.feature_dim)
    h = torch.randn(4, s.model.feature_dim, generator=torch.Generator().manual_seed(3))
    # s_ck = -|h/|h| - theta_ck/|theta_ck||^2, s_c = sum_k softmax_k(s_ck) s_ck (Eq. 5-6, gamma = 1)
    dist = -((F.normalize(h, dim=1)[:, None] - F.normalize(head.weight.detach(), dim=1)[None]) ** 2).sum(-1)
    per_class = dist.view(4, -1, 10)
    expected = (per_class.softmax(2) * per_class).sum(2)
    assert torch.allclose(s.similarities(h), expected, atol=1e-5)


def test_adaptive_factor_scales_both_pod_terms_by_sqrt_seen_over_new(tmp_path, monkeypatch):
    assert adaptive_factor(6, 1) == math.sqrt(6) and adaptive_factor(50, 10) == math.sqrt(5)
    factors, checked, steps = [], [], {}
    original = PODNet.train_step

    def train_step(self, batch):
        steps[batch.task.id] = steps.get(batch.task.id, 0) + 1
        if steps[batch.task.id] == 1:
            factors.append((batch.task.id, self.factor))
        if steps[batch.task.id] == 2:  # at the first step the student still equals the teacher
            if self.teacher is not None:
                loss, parts = self.objective(batch.x, batch.y)
                weighted = self.factor * (3.0 * parts["pod_spatial"] + 1.0 * parts["pod_flat"])
                assert torch.allclose(loss, parts["nca"] + weighted, rtol=1e-6)
                assert parts["pod_spatial"] > 0 and parts["pod_flat"] > 0
                checked.append(batch.task.id)
        return original(self, batch)

    monkeypatch.setattr(PODNet, "train_step", train_step)
    Runner(compose_cfg(*SMALL, *B_HALF, "strategy.finetune_epochs=1"), tmp_path).run()
    assert factors == [(0, 1.0)] + [(t, math.sqrt((5 + t) / 1)) for t in range(1, 6)]
    assert checked == [1, 2, 3, 4, 5]


# ----- the classifier's bookkeeping ----------------------------------------------------------------


def test_kmeans_is_seeded_and_returns_the_means_of_its_clusters():
    x = torch.randn(60, 5, generator=torch.Generator().manual_seed(4))
    a = kmeans(x, 4, torch.Generator().manual_seed(9))
    b = kmeans(x, 4, torch.Generator().manual_seed(9))
    assert torch.equal(a, b)
    assign = torch.cdist(x.double(), a.double()).argmin(1)
    for k in range(4):  # a Lloyd fixed point: each centre is the mean of its points
        assert torch.allclose(a[k], x[assign == k].mean(0), atol=1e-5)
    few = kmeans(x[:3], 4, torch.Generator().manual_seed(9))
    assert torch.equal(few, x[[0, 1, 2, 0]])


def test_new_proxies_are_kmeans_centres_and_old_proxies_only_move_in_the_fine_tuning(tmp_path, monkeypatch):
    seen = {}
    before, after = PODNet.before_task, PODNet.after_task

    def spy_before(self, task):
        before(self, task)
        w = self.model.head.weight.detach()
        seen[task.id] = {"start": w.clone()}
        if task.id > 0:
            feats = F.normalize(self.embed(task.train.x), dim=1)
            old = [o for t in self.stream.tasks[: task.id] for o in t.outputs]
            scale = w[self.rows(old)].norm(dim=1).mean()
            for c in task.outputs:
                centres = w[self.rows([c])] / scale
                f = feats[task.train.y == c]
                assign = torch.cdist(f, centres).argmin(1)
                for k in range(self.proxies):  # k-means fixed point on the class's normalised features
                    if (assign == k).any():
                        assert torch.allclose(centres[k], f[assign == k].mean(0), atol=1e-5)

    def spy_after(self, task):
        seen[task.id]["trained"] = self.model.head.weight.detach().clone()
        after(self, task)
        seen[task.id]["end"] = self.model.head.weight.detach().clone()

    monkeypatch.setattr(PODNet, "before_task", spy_before)
    monkeypatch.setattr(PODNet, "after_task", spy_after)
    runner = Runner(compose_cfg(*SMALL, "train.momentum=0.9", "train.weight_decay=5e-4"), tmp_path)
    runner.run()
    s, stream = runner.strategy, runner.stream
    for t in range(1, len(stream)):
        others = torch.ones(len(s.model.head.weight), dtype=torch.bool)
        others[s.rows(stream.tasks[t].outputs).cpu()] = False
        mine = ~others
        assert torch.equal(seen[t]["trained"][others], seen[t]["start"][others])  # frozen while the task trains
        assert not torch.equal(seen[t]["trained"][mine], seen[t]["start"][mine])
        old = s.rows([o for k in stream.tasks[:t] for o in k.outputs]).cpu()
        assert not torch.equal(seen[t]["end"][old], seen[t]["trained"][old])  # the balanced fine-tuning trains them


def test_one_task_equals_plain_nca_training_of_the_lsc(tmp_path):
    """With one task there is no teacher, no imprinting and no fine-tuning: PODNet is SGD on the
    NCA loss of the local similarity classifier (with the authors' gradient clamp), written here
    from the formulas and run on the same batches."""
    overrides = ("strategy=podnet", "dataset.num_tasks=1", "dataset.max_train_per_class=30", "train.epochs=2",
                 "train.momentum=0.9", "train.weight_decay=5e-4", "strategy.pod_spatial=0", "strategy.pod_flat=0",
                 "strategy.margin=0.1", "checkpoint=false", "seed=5")
    runner = Runner(compose_cfg(*overrides), tmp_path / "podnet")
    result = runner.run()
    ref = Runner(compose_cfg(*overrides), tmp_path / "ref")
    ref.build()
    model, stream, cfg = ref.strategy.model, ref.stream, ref.cfg.train
    task = stream.tasks[0]
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    data, n = task.train, len(task.train)
    for _ in range(cfg.epochs):
        order = torch.randperm(n, generator=ref.data_generator)
        for b in range(0, n, cfg.batch_size):
            idx = order[b : b + cfg.batch_size]
            x = stream.transform(data.x[idx], train=True, generator=ref.data_generator)
            y = data.y[idx]
            model.train()
            h = F.normalize(model.features(x), dim=1)
            w = F.normalize(model.head.weight, dim=1)
            dist = -((h[:, None] - w[None]) ** 2).sum(-1).view(len(x), -1, 10)
            sim = (dist.softmax(2) * dist).sum(2)
            z = model.head.sigma * (sim - 0.1 * F.one_hot(y, sim.shape[1]))
            z = z - z.max(1, keepdim=True).values
            pos = z.gather(1, y[:, None]).squeeze(1)
            neg = torch.exp(z).scatter(1, y[:, None], 1.0).sum(1).log()
            loss = (neg - pos).mean()
            opt.zero_grad()
            loss.backward()
            for p in model.parameters():
                p.grad.clamp_(-5, 5)
            opt.step()
    for (name, p), q in zip(runner.strategy.model.named_parameters(), model.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6), name
    model.eval()
    with torch.no_grad():
        pred = ref.strategy.predict(stream.transform(task.test.x)).argmax(1)
    acc = (pred == task.test.y).float().mean().item()
    assert result["accuracy_matrix"][0][0] == pytest.approx(acc, abs=1e-6) and acc > 0.5
    assert runner.strategy.model.head.sigma.item() != 1.0  # the scale is learned


# ----- the run ------------------------------------------------------------------------------------


def test_podnet_beats_finetune_on_split_digits_b_half(tmp_path):
    common = ("train.epochs=3", *B_HALF, "checkpoint=false", "seed=0")
    pod = Runner(compose_cfg("strategy=podnet", *common), tmp_path / "pod").run()["metrics"]["acc"]
    ft = Runner(compose_cfg("strategy=finetune", *common), tmp_path / "ft").run()["metrics"]["acc"]
    assert pod > ft + 0.4, (pod, ft)


def test_teacher_is_frozen_in_eval_mode_with_batch_norm(tmp_path, monkeypatch):
    checked = spy_frozen_teacher(monkeypatch, PODNet, "teacher")
    Runner(compose_cfg(*SMALL, "backbone=reduced_resnet18", "backbone.nf=4", "dataset.num_tasks=2",
                       "strategy.finetune_epochs=1"), tmp_path).run()
    assert checked


def test_resume_after_kill_gives_the_same_matrix(tmp_path, monkeypatch):
    overrides = ("strategy=podnet", "train.epochs=1", "dataset.max_train_per_class=20", "seed=3", "strategy.finetune_epochs=2")
    reference, resumed = run_killed_and_resumed(tmp_path, monkeypatch, overrides, kill_at_task=2)
    assert np.array_equal(np.asarray(resumed["accuracy_matrix"]), np.asarray(reference["accuracy_matrix"]))
    assert resumed["strategy_info"] == reference["strategy_info"]


@pytest.mark.parametrize(
    "key,value",
    [("proxies", 0), ("margin", -0.1), ("pod_spatial", -1), ("pod_flat", "nan"), ("finetune_epochs", -1),
     ("finetune_lr_factor", 0), ("grad_clamp", -5), ("proxy_init", "imprint"), ("memory_size", 0), ("selection", "reservoir")],
)
def test_bad_hyperparameters_are_refused_in_one_line(key, value, tmp_path):
    with pytest.raises(CLBenchError) as err:
        Runner(compose_cfg("strategy=podnet", f"strategy.{key}={value}"), tmp_path).run()
    message = str(err.value)
    assert f"strategy.{key}" in message and "\n" not in message.strip()


def test_task_il_is_refused(tmp_path):
    with pytest.raises(CLBenchError, match="class_il"):
        Runner(compose_cfg("strategy=podnet", "scenario=task_il"), tmp_path).run()
