"""X-DER (cl_bench/strategies/xder.py): the stored logits' update schedule and rescaling
rule, the memory's class balance and budget, SupCon against its definition, the
reduction to finetune with every term off, resume, and refused hyperparameters."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cl_bench import CLBenchError
from cl_bench.runner import Runner
from cl_bench.strategies.xder import XDER, BalancedLogitMemory, rescale_to_ground_truth, supcon_loss
from tests.conftest import compose_cfg, run_killed_and_resumed

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ("backbone=mlp", "backbone.hidden_sizes=[32,32]", "checkpoint=false", "device.num_threads=1")
OFF = ("strategy.memory_size=0", "strategy.alpha=0", "strategy.beta=0", "strategy.lambd=0", "strategy.eta=0")


def runner_with_hooks(tmp_path, overrides, after_task=None, around_step=None) -> Runner:
    """A Runner calling `after_task(strategy, stream, task)` after each task's training
    (after the strategy's own after_task) and `around_step(strategy, batch, step)` around
    each training step (`step()` runs the real one)."""
    runner = Runner(compose_cfg(*overrides), tmp_path)
    original_task = runner._train_task

    def train_task(task, bar):
        log = original_task(task, bar)
        if after_task is not None:
            after_task(runner.strategy, runner.stream, task)
        return log

    runner._train_task = train_task
    if around_step is not None:
        original_build = runner.build

        def build():
            original_build()
            strategy = runner.strategy
            step = strategy.train_step
            strategy.train_step = lambda batch: around_step(strategy, batch, lambda: step(batch))

        runner.build = build
    return runner


# ----- the rescaling rule and SupCon, on constructed examples -------------------------------------
def test_rescale_rule_on_a_constructed_example():
    responses = torch.tensor([[2.0, 1.0, -1.0], [0.5, 0.2, 0.1], [1.0, 0.5, 0.0], [3.0, 1.5, 0.0]])
    gt = torch.tensor([1.0, 1.0, 1.0, -1.0])
    out = rescale_to_ground_truth(responses, gt, 0.85)
    expected = torch.tensor(
        [
            [0.85, 0.425, -0.425],  # max 2 > gt 1: x 0.85 * 1 / 2
            [0.5, 0.2, 0.1],  # max 0.5 <= gt: unchanged
            [1.0, 0.5, 0.0],  # max == gt: unchanged (the code's strict >)
            [-0.85, -0.425, 0.0],  # gt < 0: the factor 0.85 * -1 / 3 is negative, as in the authors' code
        ]
    )
    assert torch.allclose(out, expected, atol=1e-7, rtol=0)
    assert torch.equal(out[1:3], responses[1:3])


def test_supcon_matches_its_definition():
    g = torch.Generator().manual_seed(0)
    feats = torch.nn.functional.normalize(torch.randn(5, 3, 4, generator=g), dim=2)
    labels = torch.tensor([0, 1, 0, 2, 1])
    temperature = 0.7
    got = supcon_loss(feats, labels, temperature)
    # Khosla et al. Eq. 2, anchor by anchor: -1/|P(i)| sum_p log exp(z_i.z_p/T) / sum_{a != i} exp(z_i.z_a/T)
    z = [(n, v) for v in range(3) for n in range(5)]
    expected = torch.zeros(5)
    for i, (n, v) in enumerate(z):
        others = [j for j in range(len(z)) if j != i]
        denom = torch.logsumexp(torch.stack([feats[n, v] @ feats[z[j]] / temperature for j in others]), 0)
        pos = [j for j in others if labels[z[j][0]] == labels[n]]
        expected[n] += -torch.stack([feats[n, v] @ feats[z[j]] / temperature - denom for j in pos]).mean() / 3
    assert torch.allclose(got, expected, atol=1e-5)


# ----- the stored logits: written at insertion, rewritten only on heads t, t+1, ... ---------------
def test_stored_logits_follow_the_update_schedule(tmp_path):
    """MLP without dropout: a sample's responses do not depend on the mode or the batch.
    After each task t, for every stored sample (identified by its image and label):
    - entering (task t): its logits are the model's, past heads rescaled to gamma x gt;
    - older: the slots of heads < t are exactly what they were after task t-1 (so the
      own head and earlier ones are exactly the insertion values), the slots of heads >= t
      are the model's responses rescaled against the stored ground-truth logit.
    During each task's steps, the slots of heads < t never change, those >= t do (online,
    each replay of a slot with probability 1 / its replays so far).
    Prediction never returns a class not trained yet."""
    gamma = 0.85
    inserted: dict = {}
    previous: dict = {}
    online_changes = {}

    def key(x, y):
        return (x.cpu().numpy().tobytes(), int(y))

    def around_step(s, batch, step):
        before = None if s.memory.logits is None else s.memory.logits.clone()
        replays_before = None if s.memory.counter is None else s.memory.counter.sum().item()
        out = step()
        if before is not None:
            t = batch.task.id
            past = s._output_task < t
            assert torch.equal(s.memory.logits[:, past], before[:, past]), "a step changed a past head's stored logit"
            changed = (s.memory.logits != before).any(1).sum().item()
            counts = online_changes.setdefault(t, {"rewrites": 0, "replays": 0, "slots": 0})
            counts["rewrites"] += changed
            counts["replays"] += s.memory.counter.sum().item() - replays_before
            counts["slots"] = (s.memory.counter > 0).sum().item()
        return out

    def after(s, stream, task):
        t, m = task.id, s.memory
        with torch.no_grad():
            s.model.eval()
            responses = s.model(stream.transform(m.x[: m.size]))
        task_of = s._output_task
        rows = {}
        for i in range(m.size):
            y = int(m.y[i])
            k, row, r = int(task_of[y]), m.logits[i], responses[i]
            rows[key(m.x[i], y)] = row.clone()
            if k == t:
                past = task_of < t
                expected = r.clone()
                if t > 0:
                    expected[past] = rescale_to_ground_truth(r[past].unsqueeze(0), r[y].view(1), gamma)[0]
                assert torch.allclose(row, expected, atol=1e-5, rtol=1e-5)
                inserted[key(m.x[i], y)] = row.clone()
            else:
                assert k < t
                before = previous[key(m.x[i], y)]
                done = task_of < t
                assert torch.equal(row[done], before[done]), f"task {t}: an old head's slot changed"
                own = task_of <= k
                assert torch.equal(row[own], inserted[key(m.x[i], y)][own])
                expected = rescale_to_ground_truth(r[~done].unsqueeze(0), row[y].view(1), gamma)[0]
                assert torch.allclose(row[~done], expected, atol=1e-5, rtol=1e-5)
        previous.clear()
        previous.update(rows)
        seen = {o for tk in stream.tasks[: t + 1] for o in tk.outputs}
        for tk in stream.tasks:
            pred = s.predict(stream.transform(tk.test.x)).argmax(1)
            assert set(pred.tolist()) <= seen

    runner = runner_with_hooks(
        tmp_path,
        ("strategy=xder", *TINY, "dataset.max_train_per_class=20", "train.epochs=3", "strategy.memory_size=40"),
        after, around_step,
    )
    runner.run()
    assert len(inserted) > 30
    # online rewrites: a slot's first replay in a task always rewrites it, its n-th with
    # probability 1/n (a reservoir over its responses), so far fewer rewrites than replays
    for t in range(1, 5):
        counts = online_changes[t]
        assert counts["slots"] > 0 and counts["rewrites"] > 0, online_changes
        assert counts["rewrites"] < 0.6 * counts["replays"], online_changes


# ----- memory: filled at task ends, full and class-balanced, within budget ------------------------
def test_memory_is_class_balanced_within_budget(tmp_path, monkeypatch):
    """33 samples: old classes keep floor(33 / seen) each, the new classes share the rest
    (floor or floor + 1 each), the memory is full; nothing is stored during the first task."""
    sizes = []
    original = BalancedLogitMemory.rebuild

    def rebuild(self, *args):
        original(self, *args)
        sizes.append(len(self))
        assert len(self) <= 33 and len(self.x) <= 33 and len(self.logits) <= 33

    monkeypatch.setattr(BalancedLogitMemory, "rebuild", rebuild)
    empty_during_first = []

    def around_step(s, batch, step):
        if batch.task.id == 0:
            empty_during_first.append(len(s.memory) == 0)
        return step()

    def after(s, stream, task):
        counts = torch.bincount(s.memory.y[: s.memory.size], minlength=stream.num_outputs)
        seen = [o for tk in stream.tasks[: task.id + 1] for o in tk.outputs]
        old = [o for tk in stream.tasks[: task.id] for o in tk.outputs]
        assert counts.sum().item() == 33
        assert all(counts[c].item() == 33 // len(seen) for c in old)
        room = 33 - len(old) * (33 // len(seen))
        share = room // len(task.outputs)
        assert all(counts[c].item() in (share, share + 1) for c in task.outputs)
        assert all(counts[c].item() == 0 for c in range(stream.num_outputs) if c not in seen)

    runner = runner_with_hooks(
        tmp_path,
        ("strategy=xder", *TINY, "dataset.max_train_per_class=30", "train.epochs=1", "strategy.memory_size=33"),
        after, around_step,
    )
    s = runner.run()
    assert sizes == [33] * 5 and empty_during_first and all(empty_during_first)
    assert all(log["strategy"]["exemplars"] == 33 for log in s["train_log"])


def test_task_end_leaves_the_batch_norm_statistics_alone(tmp_path, monkeypatch):
    """The insertion and rewrite passes use batch statistics without updating the running
    ones (the authors' bn_track_stats(False)): after_task changes nothing in the model."""
    original, checked = XDER.after_task, []

    def after_task(self, task):
        before = {k: v.clone() for k, v in self.model.state_dict().items()}
        original(self, task)
        after = self.model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
        checked.append(task.id)

    monkeypatch.setattr(XDER, "after_task", after_task)
    Runner(compose_cfg("strategy=xder", "backbone=reduced_resnet18", "backbone.nf=4", "dataset.max_train_per_class=10",
                       "train.epochs=1", "checkpoint=false", "device.num_threads=1", "dataset.num_tasks=2"),
           tmp_path).run()
    assert checked == [0, 1]


# ----- every term off: finetune's task-IL training ------------------------------------------------
def _state(runner):
    return {k: v.detach().clone() for k, v in runner.strategy.model.state_dict().items()}


@pytest.mark.parametrize(
    "protocol",
    [
        ("train.optimizer=sgd", "train.momentum=0.9", "train.weight_decay=5e-4", "backbone.dropout=0.5",
         "backbone.hidden_sizes=[32,32]"),
        ("train.optimizer=adamw", "train.lr=0.01", "train.weight_decay=0.01", "backbone=reduced_resnet18",
         "backbone.nf=4"),
    ],
    ids=["sgd-momentum-wd-dropout", "adamw-batchnorm"],
)
def test_terms_off_is_finetune_task_il_bit_for_bit(protocol, tmp_path):
    """memory_size=0, alpha=beta=lambd=eta=0: task-IL matrix and final weights equal finetune's
    bit for bit. In class-IL the training is the same (the present-head CE is task-IL's
    masked CE), so the final weights equal finetune task-IL's, and differ from class-IL
    finetune's, whose CE covers every output."""
    common = ("dataset.max_train_per_class=20", "train.epochs=2", "checkpoint=false", "device.num_threads=1", *protocol)
    runs = {}
    for name, args in {
        "xder_task": ("strategy=xder", *OFF, "scenario=task_il"),
        "finetune_task": ("strategy=finetune", "scenario=task_il"),
        "xder_class": ("strategy=xder", *OFF, "scenario=class_il"),
        "finetune_class": ("strategy=finetune", "scenario=class_il"),
    }.items():
        runner = Runner(compose_cfg(*common, *args), tmp_path / name)
        runs[name] = (runner.run(), _state(runner))
    (xt, wt), (ft, wft) = runs["xder_task"], runs["finetune_task"]
    assert np.array_equal(np.asarray(xt["accuracy_matrix"]), np.asarray(ft["accuracy_matrix"]))
    assert all(torch.equal(wt[k], wft[k]) for k in wft)
    wc, wfc = runs["xder_class"][1], runs["finetune_class"][1]
    assert all(torch.equal(wc[k], wft[k]) for k in wft)
    assert not all(torch.equal(wc[k], wfc[k]) for k in wfc)


def test_shipped_defaults_beat_finetune_and_the_terms_off_ablation(tmp_path):
    """Class-IL, 2 epochs: the terms-off ablation is finetune's task-IL training (head-local CE,
    no replay); the shipped defaults must beat it and class-IL finetune clearly."""
    common = ("dataset.max_train_per_class=30", "train.epochs=2", "checkpoint=false", "device.num_threads=1")
    xder = Runner(compose_cfg("strategy=xder", *common), tmp_path / "xder").run()
    off = Runner(compose_cfg("strategy=xder", *OFF, *common), tmp_path / "off").run()
    finetune = Runner(compose_cfg("strategy=finetune", *common), tmp_path / "finetune").run()
    assert xder["metrics"]["acc"] > off["metrics"]["acc"] + 0.05
    assert xder["metrics"]["acc"] > finetune["metrics"]["acc"] + 0.3
    assert xder["strategy_info"]["exemplars"] == 200


# ----- resume and refusals -----------------------------------------------------------------------
@pytest.mark.parametrize("scenario", ["class_il", "task_il"])
def test_resume_after_kill_gives_the_same_matrix(scenario, tmp_path, monkeypatch):
    overrides = ("strategy=xder", f"scenario={scenario}", "backbone.hidden_sizes=[32,32]", "train.epochs=1",
                 "dataset.max_train_per_class=20", "seed=3", "device.num_threads=1")
    reference, resumed = run_killed_and_resumed(tmp_path, monkeypatch, overrides, kill_at_task=2)
    assert np.array_equal(np.asarray(resumed["accuracy_matrix"]), np.asarray(reference["accuracy_matrix"]))
    assert resumed["strategy_info"] == reference["strategy_info"]


@pytest.mark.parametrize(
    "key, value",
    [
        ("alpha", -0.1), ("beta", -1), ("lambd", -0.05), ("eta", -0.01), ("margin", -0.3), ("gamma", 0),
        ("gamma", 1.5), ("simclr_temp", 0), ("simclr_batch_size", -1), ("simclr_num_aug", 1), ("memory_size", -1),
        ("replay_batch_size", 0),
    ],
)
def test_bad_hyperparameters_are_refused_naming_the_key(key, value, tmp_path):
    runner = Runner(compose_cfg("strategy=xder", f"strategy.{key}={value}", "checkpoint=false"), tmp_path)
    with pytest.raises(CLBenchError, match=rf"strategy\.{key}\b") as info:
        runner.run()
    assert "\n" not in str(info.value)


def test_domain_il_is_refused(tmp_path):
    runner = Runner(compose_cfg("strategy=xder", "scenario=domain_il", "checkpoint=false"), tmp_path)
    with pytest.raises(CLBenchError, match="domain_il"):
        runner.run()
