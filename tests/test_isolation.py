"""Parameter-isolation strategies (PNN, PackNet, Piggyback, HAT, CPG, DEN, feature
extraction, individual networks) in task-IL on the offline streams.

One protocol for all, chosen so that fine-tuning forgets even with the task id
(Adam, lr 0.01, 5 epochs): the isolation methods must keep every earlier task's
accuracy exactly (their frozen parts cannot move) and stay well above fine-tuning's
final accuracy on the early tasks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cl_bench import CLBenchError
from cl_bench.runner import Runner
from tests.conftest import compose_cfg, run_killed_and_resumed

PROTOCOL = ("scenario=task_il", "train.optimizer=adam", "train.lr=0.01", "train.epochs=5", "device.num_threads=1")
DATASETS = {"split_digits": (), "split_mnist5k": ("dataset.max_train_per_class=100",)}
ISOLATED = ["pnn", "packnet", "hat", "individual_networks", "piggyback", "cpg"]


def _run(tmp_path, name: str, *overrides: str) -> tuple[dict, Runner]:
    runner = Runner(compose_cfg(*PROTOCOL, *overrides), tmp_path / name)
    return runner.run(), runner


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    cache: dict = {}

    def get(dataset: str, strategy: str, *extra: str) -> tuple[dict, Runner]:
        key = (dataset, strategy, extra)
        if key not in cache:
            tmp = tmp_path_factory.mktemp(f"{dataset}-{strategy}")
            cache[key] = _run(tmp, "run", f"dataset={dataset}", f"strategy={strategy}", "checkpoint=false",
                              *DATASETS[dataset], *extra)
        return cache[key]

    return get


@pytest.mark.parametrize("dataset", list(DATASETS))
@pytest.mark.parametrize("strategy", ISOLATED)
def test_forgets_nothing_and_beats_finetune(runs, dataset, strategy):
    finetune = np.asarray(runs(dataset, "finetune")[0]["accuracy_matrix"])
    R = np.asarray(runs(dataset, strategy)[0]["accuracy_matrix"])
    early = finetune[-1, :2].mean()
    assert finetune[-1, :2].max() < 0.8, "the protocol should make fine-tuning forget the early tasks"
    for j in range(len(R)):  # accuracy on task j never changes after task j is trained
        assert np.abs(R[j:, j] - R[j, j]).max() <= 1e-9, (strategy, j, R[:, j])
    assert R[-1].min() > early + 0.25, (strategy, R[-1], early)


def test_den_and_feature_extraction_keep_early_tasks_better_than_finetune(runs):
    finetune = np.asarray(runs("split_digits", "finetune")[0]["accuracy_matrix"])
    den = np.asarray(runs("split_digits", "den")[0]["accuracy_matrix"])
    fx = np.asarray(runs("split_digits", "feature_extraction")[0]["accuracy_matrix"])
    assert den[-1, :3].min() > finetune[-1, :3].max() - 0.05 and den[-1, :2].mean() > finetune[-1, :2].mean() + 0.25
    assert den[-1].mean() > 0.9
    # feature extraction: frozen features and per-task heads, so no forgetting at all...
    for j in range(len(fx)):
        assert np.abs(fx[j:, j] - fx[j, j]).max() <= 1e-9
    # ...but later tasks only get the first task's features: below individual networks
    individual = np.asarray(runs("split_digits", "individual_networks")[0]["accuracy_matrix"])
    assert fx[-1, 1:].mean() < individual[-1, 1:].mean() - 0.05


def test_packnet_masks_are_disjoint_and_cover_the_pruned_fraction(runs):
    summary, runner = runs("split_digits", "packnet")
    strategy = runner.strategy
    ratio = strategy.prune_ratio
    T = len(strategy.stream)
    for l, owner in enumerate(strategy.owners.owner):
        own = [owner == t + 1 for t in range(T)]
        for a in range(T):
            for b in range(a + 1, T):
                assert not (own[a] & own[b]).any()
        free = owner.numel()
        for t in range(T):
            kept = int(own[t].sum())
            assert kept == pytest.approx((1 - ratio) * free, abs=1), (l, t)  # pruned fraction as asked
            free -= kept
            # the test-time mask of task t is exactly the weights of tasks 0..t
            assert torch.equal(strategy.owners.visible(t)[l], sum(own[: t + 1]).bool())
        assert (strategy.model.hidden[l].weight[owner == 0] == 0).all()  # released weights are zero
    # a later task's weights are in use: switching them off for task 4 changes its scores
    x = strategy.stream.transform(strategy.stream.tasks[4].test.x[:64])
    with torch.no_grad():
        strategy.model.set_masks(strategy.owners.visible(3))
        without = strategy.model(x)
        assert not torch.allclose(strategy.predict(x, 4), without)
    counts = summary["strategy_info"]["weights_per_task"]
    assert counts[0] > counts[1] > counts[2] > 0
    assert summary["strategy_info"]["mask_bytes"] == sum(o.numel() for o in strategy.owners.owner)


def test_pnn_grows_by_one_column_per_task(runs):
    summary, runner = runs("split_digits", "pnn")
    params = [log["parameters"] for log in summary["train_log"]]
    n_in, h, out = 64, 256, 10

    def column(k: int) -> int:
        base = n_in * h + h + h * h + h + h * out + out
        adapters = 0 if k == 0 else 2 + (k * h * h + h + h * h) + (k * h * h + h + h * out)
        return base + adapters

    assert params[0] == column(0)
    for k in range(1, len(params)):
        assert params[k] - params[k - 1] == column(k)
    assert summary["strategy_info"]["parameters_per_column"] == [column(k) for k in range(len(params))]
    # earlier columns are frozen, the last one trains
    cols = runner.strategy.model.columns
    assert not any(p.requires_grad for c in cols[:-1] for p in c.parameters())


def test_model_size_is_reported_after_each_task(runs):
    for name in ["pnn", "packnet", "hat", "piggyback", "cpg", "den", "individual_networks", "feature_extraction"]:
        summary = runs("split_digits", name)[0]
        for t, log in enumerate(summary["train_log"]):
            info = log["strategy"]
            assert info["parameters_total"] == log["parameters"]
            assert len(info["parameters_per_task"]) == t + 1 and min(info["parameters_per_task"]) > 0
            assert info["mask_bytes"] >= 0
        text = (Path(summary["output_dir"]) / "results.md").read_text()
        assert "Model size after each task" in text
    hat = runs("split_digits", "hat")[0]["strategy_info"]
    assert all(0 < u < 256 for units in hat["units_per_task"] for u in units)  # sparse attention per task
    piggy = runs("split_digits", "piggyback")[0]["strategy_info"]
    assert all(0.05 < d < 0.99 for d in piggy["mask_density"])  # masks were learned, not left at init


def test_piggyback_keeps_the_backbone_fixed_after_the_first_task(tmp_path, monkeypatch):
    from cl_bench.strategies.piggyback import Piggyback

    saved = {}
    original = Piggyback.after_task

    def spy(self, task):
        original(self, task)
        if task.id == 0:
            saved["weights"] = [l.weight.detach().clone() for l in self.model.hidden]

    monkeypatch.setattr(Piggyback, "after_task", spy)
    _, runner = _run(tmp_path, "pb", "strategy=piggyback", "train.epochs=1")
    for layer, before in zip(runner.strategy.model.hidden, saved["weights"]):
        assert torch.equal(layer.weight, before)  # tasks 1-4 only learned masks and heads
    masks = runner.strategy.masks
    assert masks[0] is None and all(m is not None for m in masks[1:])
    assert not all(torch.equal(a, b) for a, b in zip(masks[1], masks[2]))  # one mask per task


def test_cpg_grows_when_below_its_accuracy_goal_and_still_forgets_nothing(tmp_path):
    s, runner = _run(tmp_path, "cpg", "strategy=cpg", "strategy.target_acc=1.01", "strategy.max_grow=1",
                     "strategy.grow_units=8", "train.epochs=2")
    info = s["strategy_info"]
    assert info["units_grown"] == [8] * 5
    assert [l.out_units for l in runner.strategy.model.hidden] == [256 + 40, 256 + 40]
    R = np.asarray(s["accuracy_matrix"])
    for j in range(len(R)):
        assert np.abs(R[j:, j] - R[j, j]).max() <= 1e-9
    assert any(p is not None and any(m.any() for m in p) for p in runner.strategy.picks)  # earlier weights picked


def test_den_expands_and_splits(runs):
    info = runs("split_digits", "den")[0]["strategy_info"]
    assert sum(info["units_added"]) > 0 and sum(info["units_split"]) > 0
    assert sum(info["units"]) > 512


@pytest.mark.parametrize("strategy,extra", [
    ("pnn", ()),
    ("packnet", ()),
    ("cpg", ("strategy.target_acc=1.01", "strategy.max_grow=1", "strategy.grow_units=8")),
    ("den", ()),
])
def test_resume_after_kill_gives_the_same_matrix(tmp_path, monkeypatch, strategy, extra):
    overrides = (*PROTOCOL, f"strategy={strategy}", "train.epochs=2", *extra)
    reference, resumed = run_killed_and_resumed(tmp_path, monkeypatch, overrides, kill_at_task=2)
    assert np.array_equal(np.asarray(resumed["accuracy_matrix"]), np.asarray(reference["accuracy_matrix"]))
    assert resumed["parameters"] == reference["parameters"]


def test_class_il_and_domain_il_are_refused_before_training(tmp_path):
    import subprocess
    import sys

    for scenario in ("class_il", "domain_il"):
        with pytest.raises(CLBenchError, match=f"does not support scenario={scenario}"):
            Runner(compose_cfg("strategy=packnet", f"scenario={scenario}"), tmp_path / scenario).run()
        assert not (tmp_path / scenario / "metrics.json").exists()
    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, "-m", "cl_bench.cli", "run", "strategy=pnn", "scenario=class_il",
                           f"hydra.run.dir={out}"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode != 0 and "does not support scenario=class_il" in proc.stderr
    assert not (out / "metrics.json").exists()


@pytest.mark.parametrize("override,key", [
    ("strategy=packnet strategy.prune_ratio=1.5", "strategy.prune_ratio"),
    ("strategy=piggyback strategy.mask_lr=-1", "strategy.mask_lr"),
    ("strategy=hat strategy.s_max=0.5", "strategy.s_max"),
    ("strategy=cpg strategy.grow_units=-2", "strategy.grow_units"),
    ("strategy=den strategy.l1=-1", "strategy.l1"),
    ("strategy=pnn strategy.alpha_init=-1", "strategy.alpha_init"),
])
def test_bad_hyperparameters_name_the_key(tmp_path, override, key):
    with pytest.raises(CLBenchError, match=key.replace(".", r"\.")):
        Runner(compose_cfg("scenario=task_il", *override.split()), tmp_path).run()


# ----- the real protocol: batch-norm backbones, SGD with momentum and weight decay, AdamW -----

BN_DATA = ("dataset=split_digits", "dataset.max_train_per_class=20", "scenario=task_il", "train.epochs=2",
           "train.batch_size=16", "checkpoint=false", "device.num_threads=1")
RESNET = ("backbone=reduced_resnet18", "backbone.nf=4")
OPTIMIZERS = {
    "sgd": ("train.optimizer=sgd", "train.lr=0.01", "train.momentum=0.9", "train.weight_decay=5e-4"),
    "adamw": ("train.optimizer=adamw", "train.lr=0.01", "train.weight_decay=0.01"),
}
# isolation strategies x the backbone they run on here (PNN's columns are MLPs: it refuses ResNets)
LOGIT_CASES = {
    "packnet": RESNET, "cpg": RESNET, "hat": RESNET, "piggyback": RESNET, "individual_networks": RESNET,
    "feature_extraction": RESNET, "pnn": ("backbone=mlp", "backbone.hidden_sizes=[32,32]", "backbone.dropout=0.2"),
    "packnet+authors_bn": (*RESNET, "strategy.task_batchnorm=false"),  # BN fixed after task 0
}


def _logits_after_each_task(tmp_path, monkeypatch, *overrides: str) -> list[list]:
    """logits[i][k]: task k's logits (its outputs) on a fixed batch of its test inputs after task i (k <= i)."""
    original, record = Runner._train_task, []

    def spy(self, task, bar):
        log = original(self, task, bar)
        strategy, stream = self.strategy, self.stream
        strategy.set_training(False)
        with torch.no_grad():
            record.append([strategy.predict(stream.transform(t.test.x[:16].to(strategy.device)), t.id)[:, t.outputs].clone()
                           for t in stream.tasks[: task.id + 1]])
        return log

    monkeypatch.setattr(Runner, "_train_task", spy)
    Runner(compose_cfg(*BN_DATA, *overrides), tmp_path).run()
    return record


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("strategy", list(LOGIT_CASES))
def test_earlier_tasks_logits_unchanged_on_batchnorm_backbones(tmp_path, monkeypatch, strategy, optimizer):
    """Frozen means frozen for every optimizer path: momentum, (decoupled) weight decay,
    batch-norm affine parameters and running statistics (shipped strategy defaults)."""
    torch.set_num_threads(1)
    logits = _logits_after_each_task(tmp_path, monkeypatch, f"strategy={strategy.split('+')[0]}",
                                     *LOGIT_CASES[strategy], *OPTIMIZERS[optimizer])
    T, atol = len(logits), 1e-5
    for k in range(T - 1):
        for i in range(k + 1, T):
            diff = float((logits[i][k] - logits[k][k]).abs().max())
            assert torch.allclose(logits[i][k], logits[k][k], rtol=1e-5, atol=atol), (strategy, optimizer, k, i, diff)
    # the later tasks did train: their logits are not those of the untrained network
    assert not torch.allclose(logits[-1][-1], logits[-1][-1].mean(), atol=1e-3)


@pytest.mark.parametrize("strategy", ["pnn", "den"])
def test_backbones_a_strategy_cannot_support_are_refused_before_training(tmp_path, strategy):
    with pytest.raises(CLBenchError) as info:
        Runner(compose_cfg(*BN_DATA, f"strategy={strategy}", *RESNET), tmp_path).run()
    assert "\n" not in str(info.value) and "ReducedResNet18" in str(info.value)
    assert not (tmp_path / "metrics.json").exists()


def test_small_resnets_expose_body_and_head_and_load_old_state_dicts():
    from cl_bench.models.masked import MaskedNet
    from cl_bench.models.resnet import ReducedResNet18, ResNet32

    for net in (ReducedResNet18((3, 32, 32), 10, nf=4), ResNet32((3, 32, 32), 10, nf=4, blocks_per_stage=1)):
        net.eval()
        x = torch.randn(3, 3, 32, 32)
        assert torch.equal(net(x), net.head(net.body(x))) and torch.equal(net.features(x), net.body(x))
        old = {k.replace("body.", "", 1): v for k, v in net.state_dict().items()}  # keys before `body` existed
        fresh = type(net)((3, 32, 32), 10, nf=4, **({} if isinstance(net, ReducedResNet18) else {"blocks_per_stage": 1}))
        fresh.load_state_dict(old)
        assert torch.equal(fresh.eval()(x), net(x))
        masked = MaskedNet(net).eval()
        assert torch.allclose(masked(x), net(x), atol=1e-6) and not masked.is_chain


def test_cpg_without_growth_warns_on_resnets(tmp_path):
    s = Runner(compose_cfg(*BN_DATA, "strategy=cpg", *RESNET, "train.epochs=1"), tmp_path).run()
    assert any("CPG cannot grow ReducedResNet18" in w for w in s["warnings"])
    assert s["strategy_info"]["units_grown"] == [0] * 5


def test_individual_networks_all_start_as_the_first_did(tmp_path, monkeypatch):
    from cl_bench.strategies.individual_networks import IndividualNetworks

    starts = []
    original = IndividualNetworks.before_task

    def spy(self, task):
        original(self, task)
        starts.append({k: v.clone() for k, v in self.model[task.id].state_dict().items()})

    monkeypatch.setattr(IndividualNetworks, "before_task", spy)
    Runner(compose_cfg(*BN_DATA, "strategy=individual_networks", *RESNET, "train.epochs=1"), tmp_path).run()
    assert len(starts) == 5
    for state in starts[1:]:
        assert all(torch.equal(state[k], starts[0][k]) for k in starts[0])


def test_pnn_keeps_dropout_and_counts_the_parameters_a_task_uses(tmp_path):
    s, runner = _run(tmp_path, "pnn", "strategy=pnn", "backbone.hidden_sizes=[32,32]", "backbone.dropout=0.5",
                     "train.epochs=1")
    net = runner.strategy.model
    assert all(isinstance(c.dropout, torch.nn.Dropout) and c.dropout.p == 0.5 for c in net.columns)
    x = runner.stream.transform(runner.stream.tasks[0].test.x[:8])
    net.train()
    assert not torch.equal(net(x, 2), net(x, 2))  # dropout is active in training mode
    n_in, h, out, k_out = 64, 32, 10, 2

    def hidden(k: int) -> int:  # hidden layers, hidden adapters and their alphas
        return n_in * h + h + h * h + h + (0 if k == 0 else k * h * h + h + h * h + 1)

    def head(k: int) -> int:  # the task's head rows, the head adapter (V, the task's rows of U, alpha)
        return k_out * (h + 1) + (0 if k == 0 else k * h * h + h + k_out * h + 1)

    used = s["strategy_info"]["parameters_per_task"]
    assert used == [hidden(k) + head(k) + sum(hidden(j) for j in range(k)) for k in range(5)]
    assert s["strategy_info"]["parameters_total"] > used[-1]


def test_den_caps_its_splits_and_keeps_the_biases_of_units_it_does_not_retrain(runs, monkeypatch, tmp_path):
    info = runs("split_digits", "den")[0]["strategy_info"]
    from cl_bench.strategies.den import DEN

    cap = DEN().expand_units
    assert all(n <= cap * 2 for n in info["units_split"])  # at most expand_units per layer (2 layers) and task
    assert max(info["units"]) <= 256 + 4 * 3 * cap  # per task at most expand_units added and split
    checked = []
    before, after = DEN.before_task, DEN.after_task

    def spy_before(self, task):
        before(self, task)
        if task.id > 0:
            self._kept = [(l.bias.detach().clone(), ~s) for l, s in zip(self.model.hidden, self.selected)]

    def spy_after(self, task):
        after(self, task)
        for layer, (bias, fixed) in zip(self.model.hidden, getattr(self, "_kept", [])):
            assert torch.equal(layer.bias[: len(bias)][fixed], bias[fixed]), task.id
            checked.append(task.id)

    monkeypatch.setattr(DEN, "before_task", spy_before)
    monkeypatch.setattr(DEN, "after_task", spy_after)
    # AdamW: decoupled weight decay moves every parameter in the optimizer that is not frozen
    s, _ = _run(tmp_path, "den", "strategy=den", "checkpoint=false", "train.optimizer=adamw", "train.weight_decay=0.01")
    assert checked and sum(s["strategy_info"]["units_added"]) > 0


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_hat_never_moves_what_earlier_tasks_fully_use(tmp_path, monkeypatch, optimizer):
    """Weights of units task 0 fully uses (Eq. 2 factor 0), its embedding, its head rows and
    its batch-norm copy stay bit-identical under momentum and weight decay."""
    from cl_bench.strategies.hat import HAT

    torch.set_num_threads(1)
    saved = {}
    original = HAT.after_task

    def spy(self, task):
        original(self, task)
        if task.id == 0:
            saved["state"] = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            saved["used"] = [u.clone() for u in self.used]

    monkeypatch.setattr(HAT, "after_task", spy)
    runner = Runner(compose_cfg(*BN_DATA, "strategy=hat", *RESNET, *OPTIMIZERS[optimizer]), tmp_path)
    runner.run()
    model, old = runner.strategy.model, saved["state"]
    assert any((u == 1).any() for u in saved["used"])
    names = {id(m): n for n, m in model.named_modules()}
    for layer, used in zip(model.hidden, saved["used"]):
        rows = used == 1  # conservative rule on a ResNet: every incoming weight of a fully used unit
        assert torch.equal(layer.weight[rows], old[names[id(layer)] + ".weight"][rows])
    bn = [name for name in old if ".norms.0." in name]  # task 0's batch-norm: parameters and statistics
    assert bn and all(torch.equal(model.state_dict()[name], old[name]) for name in bn)
    assert all(torch.equal(e.weight[0], old[f"task_embeddings.{i}.weight"][0]) for i, e in enumerate(model.task_embeddings))
    outputs = runner.stream.tasks[0].outputs
    assert torch.equal(model.head.weight[outputs], old["head.weight"][outputs])
