"""Parameter-isolation and fixed-feature baselines on a pretrained backbone, as the
Piggyback, PackNet and LwF papers run them on ImageNet-trained networks.

A pretrained backbone is simulated: the backbone the run config builds is given weights
trained beforehand (a few SGD steps on other data, so its batch-norm statistics are not
the initial ones) and `pretrained_weights = "test"`, as the pretrained backbones set it.
Checked: Piggyback masks every task, the first included, and never moves the pretrained
body (either batch-norm setting of the paper); PackNet prunes the pretrained weights at
setup and never moves the ones it keeps; feature extraction trains heads only; every
individual network starts from the pretrained weights; earlier tasks' logits are
bit-identical under SGD (momentum, weight decay) and AdamW; the storage each strategy
reports per task matches a hand count; HAT and CPG still run.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import cl_bench.runner as runner_module
from cl_bench.config import build as real_build
from cl_bench.models.masked import MaskedLayer
from cl_bench.runner import Runner
from tests.conftest import compose_cfg, run_killed_and_resumed

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DATA = ("dataset=split_digits", "dataset.max_train_per_class=20", "scenario=task_il", "train.epochs=2",
        "train.batch_size=16", "checkpoint=false", "device.num_threads=1")
RESNET = ("backbone=reduced_resnet18", "backbone.nf=4")
MLP = ("backbone=mlp", "backbone.hidden_sizes=[8,6]")
OPTIMIZERS = {
    "sgd": ("train.optimizer=sgd", "train.lr=0.01", "train.momentum=0.9", "train.weight_decay=5e-4"),
    "adamw": ("train.optimizer=adamw", "train.lr=0.01", "train.weight_decay=0.01"),
}


def pretrain(model: torch.nn.Module, input_shape: tuple) -> dict:
    """Weights trained beforehand on other data: a few SGD steps on shifted noise in train mode."""
    net = copy.deepcopy(model).train()
    g = torch.Generator().manual_seed(1234)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    outputs = net.head.out_features
    for _ in range(5):
        x = torch.randn(32, *input_shape, generator=g) * 2 + 0.5
        loss = F.cross_entropy(net(x), torch.randint(0, outputs, (32,), generator=g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def pretrain_backbones(monkeypatch) -> dict:
    """Every backbone the runner builds comes with pretrained weights; returns {"state": those weights}."""
    loaded: dict = {}

    def build(node, where, **kwargs):
        obj = real_build(node, where, **kwargs)
        if where == "backbone":
            loaded["state"] = pretrain(obj, tuple(kwargs["input_shape"]))
            obj.load_state_dict(loaded["state"])
            obj.pretrained_weights = "test"
        return obj

    monkeypatch.setattr(runner_module, "build", build)
    return loaded


@pytest.fixture
def pretrained(monkeypatch) -> dict:
    return pretrain_backbones(monkeypatch)


def run_recording_logits(tmp_path, monkeypatch, *overrides: str) -> tuple[dict, Runner, list]:
    """(summary, runner, logits): logits[i][k] = task k's logits (its outputs) on a fixed batch of
    its test inputs after task i (k <= i)."""
    original, record = Runner._train_task, []

    def spy(self, task, bar):
        log = original(self, task, bar)
        strategy, stream = self.strategy, self.stream
        strategy.set_training(False)
        with torch.no_grad():
            record.append([strategy.predict(stream.transform(t.test.x[:16]), t.id)[:, t.outputs].clone()
                           for t in stream.tasks[: task.id + 1]])
        return log

    monkeypatch.setattr(Runner, "_train_task", spy)
    runner = Runner(compose_cfg(*DATA, *overrides), tmp_path)
    summary = runner.run()
    monkeypatch.setattr(Runner, "_train_task", original)
    return summary, runner, record


def assert_earlier_logits_unchanged(logits: list) -> None:
    for k in range(len(logits) - 1):
        for i in range(k + 1, len(logits)):
            assert torch.equal(logits[i][k], logits[k][k]), (k, i, float((logits[i][k] - logits[k][k]).abs().max()))
    assert not torch.allclose(logits[-1][-1], logits[-1][-1].mean(), atol=1e-3)  # the last task did train


def masked_key(masked_state: dict, key: str, copy_index: int = 0) -> str:
    """The key of a backbone state entry in a MaskedNet whose batch-norm may be per task."""
    if key in masked_state:
        return key
    module, name = key.rsplit(".", 1)
    return f"{module}.norms.{copy_index}.{name}"


def bn_keys(state: dict) -> list[str]:
    return [k for k in state if k.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")
            or k.rsplit(".", 1)[0] + ".running_mean" in state]


# ----- Piggyback --------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("task_bn", [True, False], ids=["task_bn", "fixed_bn"])
def test_piggyback_masks_every_task_and_never_moves_the_pretrained_backbone(tmp_path, monkeypatch, pretrained,
                                                                             task_bn, optimizer):
    s, runner, logits = run_recording_logits(tmp_path, monkeypatch, "strategy=piggyback", *RESNET,
                                             f"strategy.task_batchnorm={str(task_bn).lower()}",
                                             "strategy.mask_lr=0.005", *OPTIMIZERS[optimizer])
    strategy, old = runner.strategy, pretrained["state"]
    T = len(runner.stream)
    assert strategy.first_masked == 0
    assert len(strategy.masks) == T and all(m is not None for m in strategy.masks)  # task 0 learned a mask too
    now = strategy.model.state_dict()
    body = [k for k in old if k.startswith("body.")]
    for k in body:  # conv weights, batch-norm parameters and statistics: the pretrained ones, bit for bit
        assert torch.equal(now[masked_key(now, k)], old[k]), k
    bn = [k for k in bn_keys(old) if k.startswith("body.") and k.endswith("running_mean")]
    assert bn
    if task_bn:  # each task learned its own batch-norm statistics, started from the pretrained ones
        for t in range(T):
            assert any(not torch.equal(now[masked_key(now, k, t + 1)], old[k]) for k in bn), t
    else:
        assert not any(".norms." in k for k in now)
    density = s["strategy_info"]["mask_density"]
    assert len(density) == T and all(0.05 < d < 1.0 for d in density), density
    assert not all(torch.equal(a, b) for a, b in zip(strategy.masks[0], strategy.masks[1]))
    assert_earlier_logits_unchanged(logits)
    # storage per task: 1 bit per conv weight, the task's batch-norm copy (4 float32 per channel) and its head rows
    info = s["strategy_info"]
    convs = [m for m in strategy.model.body.modules() if isinstance(m, MaskedLayer)]
    mask_bytes = sum((m.weight.numel() + 7) // 8 for m in convs)
    channels = sum(v.numel() for k, v in old.items() if k.startswith("body.") and k.endswith("running_mean"))
    head = 4 * 2 * (strategy.model.head.in_units + 1)
    assert info["storage_bytes_per_task"] == [mask_bytes + (16 * channels if task_bn else 0) + head] * T
    assert info["storage_base_bytes"] == 4 * sum(v.numel() for k, v in old.items()
                                                 if k.startswith("body.") and v.is_floating_point())


def test_piggyback_with_a_pretrained_file_masks_the_first_task_too(tmp_path, monkeypatch):
    from cl_bench.models.mlp import MLP as MLPNet
    from cl_bench.strategies.piggyback import Piggyback

    net = MLPNet((1, 8, 8), 10, hidden_sizes=[8, 6])
    state = pretrain(net, (1, 8, 8))
    torch.save(state, tmp_path / "backbone.pt")
    checked = []
    original = Piggyback.after_task

    def spy(self, task):  # a prediction during the task (validation) uses the task's mask so far
        x = self.stream.transform(task.test.x[:8])
        with torch.no_grad():
            during = self.predict(x, task.id)
            original(self, task)
            assert torch.equal(self.predict(x, task.id), during) and self.masks[task.id] is not None
        checked.append(task.id)

    monkeypatch.setattr(Piggyback, "after_task", spy)
    runner = Runner(compose_cfg(*DATA, "strategy=piggyback", *MLP, f"strategy.pretrained={tmp_path / 'backbone.pt'}",
                                "strategy.mask_lr=0.01"), tmp_path / "run")
    s, strategy = runner.run(), runner.strategy
    assert strategy.masks[0] is not None and s["strategy_info"]["storage_base_bytes"] == 4 * (64 * 8 + 8 + 8 * 6 + 6)
    for layer, key in zip(strategy.model.hidden, ["body.1", "body.3"]):
        assert torch.equal(layer.weight, state[key + ".weight"]) and torch.equal(layer.bias, state[key + ".bias"])
    assert checked == [0, 1, 2, 3, 4] and all(d < 0.99 for d in s["strategy_info"]["mask_density"])


# ----- PackNet ----------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("task_bn", [True, False], ids=["task_bn", "authors_bn"])
def test_packnet_prunes_the_pretrained_weights_and_never_moves_the_kept_ones(tmp_path, monkeypatch, pretrained,
                                                                           task_bn, optimizer):
    s, runner, logits = run_recording_logits(tmp_path, monkeypatch, "strategy=packnet", *RESNET,
                                             f"strategy.task_batchnorm={str(task_bn).lower()}", *OPTIMIZERS[optimizer])
    strategy, old = runner.strategy, pretrained["state"]
    owners, T = strategy.owners, len(runner.stream)
    assert strategy.pretrained_prune_ratio == 0.5  # the authors' scripted ImageNet pruning
    names = {id(m): n for n, m in strategy.model.named_modules()}
    kept_total = 0
    for l, (layer, kept) in enumerate(zip(strategy.model.hidden, owners.pretrained())):
        original = old[names[id(layer)] + ".weight"]
        assert int(kept.sum()) == pytest.approx(0.5 * kept.numel(), abs=1), l  # half of each layer pruned at setup
        assert torch.equal(layer.weight[kept], original[kept]), l  # the kept pretrained weights, bit for bit
        # the kept ones are the largest in magnitude
        assert original[kept].abs().min() >= original[~kept].abs().max(), l
        assert owners.own(0)[l].any() and not (owners.own(0)[l] & kept).any()  # task 0 trains the freed ones
        kept_total += int(kept.sum())
        visible = [owners.visible(t)[l] for t in range(T)]
        own = [owners.own(t)[l] for t in range(T)]
        for t in range(T):  # test-time masks nest: pretrained, then tasks 0..t
            assert torch.equal(visible[t], kept | torch.stack(own[: t + 1]).any(0)), (l, t)
            assert t == 0 or bool((visible[t - 1] <= visible[t]).all())
            assert all(not (own[t] & own[u]).any() for u in range(t))
    assert s["strategy_info"]["pretrained_weights_kept"] == kept_total
    if not task_bn:  # the authors' protocol: batch-norm stays the pretrained one (parameters and statistics)
        now = strategy.model.state_dict()
        assert all(torch.equal(now[k], old[k]) for k in old if k.startswith("body.") and k in bn_keys(old))
    assert_earlier_logits_unchanged(logits)


@pytest.mark.slow
def test_packnet_on_a_pretrained_backbone_resumes_to_the_same_matrix(tmp_path, monkeypatch, pretrained):
    overrides = (*DATA, "strategy=packnet", *MLP, "checkpoint=true")
    reference, resumed = run_killed_and_resumed(tmp_path, monkeypatch, overrides, kill_at_task=2)
    assert np.array_equal(np.asarray(resumed["accuracy_matrix"]), np.asarray(reference["accuracy_matrix"]))
    assert resumed["strategy_info"] == reference["strategy_info"]


def test_packnet_keeps_the_pretrained_biases_and_kept_weights_of_an_mlp(tmp_path, monkeypatch, pretrained):
    s, runner, logits = run_recording_logits(tmp_path, monkeypatch, "strategy=packnet", *MLP,
                                             "strategy.pretrained_prune_ratio=0.75", *OPTIMIZERS["adamw"])
    strategy, old = runner.strategy, pretrained["state"]
    for layer, kept, key in zip(strategy.model.hidden, strategy.owners.pretrained(), ["body.1", "body.3"]):
        assert torch.equal(layer.bias, old[key + ".bias"])  # biases belong to the pretrained network
        assert torch.equal(layer.weight[kept], old[key + ".weight"][kept])
        assert int(kept.sum()) == pytest.approx(0.25 * kept.numel(), abs=1)
    assert_earlier_logits_unchanged(logits)


# ----- feature extraction, individual networks --------------------------------------------------

@pytest.mark.slow
def test_feature_extraction_trains_only_the_heads_of_a_pretrained_backbone(tmp_path, monkeypatch, pretrained):
    s, runner, logits = run_recording_logits(tmp_path, monkeypatch, "strategy=feature_extraction", *RESNET,
                                             *OPTIMIZERS["sgd"])
    model, old = runner.strategy.model, pretrained["state"]
    now = model.state_dict()
    body = [k for k in old if not k.startswith("head.")]
    assert bn_keys(old) and all(torch.equal(now[k], old[k]) for k in body)  # task 0 included, statistics too
    for task in runner.stream.tasks:  # every task trained its head rows
        assert not torch.equal(now["head.weight"][task.outputs], old["head.weight"][task.outputs])
    assert_earlier_logits_unchanged(logits)
    info = s["strategy_info"]
    assert info["storage_bytes_per_task"] == [4 * 2 * (model.head.in_features + 1)] * 5


@pytest.mark.slow
def test_individual_networks_each_start_from_the_pretrained_weights(tmp_path, monkeypatch, pretrained):
    from cl_bench.strategies.individual_networks import IndividualNetworks

    starts = []
    original = IndividualNetworks.before_task

    def spy(self, task):
        original(self, task)
        starts.append({k: v.clone() for k, v in self.model[task.id].state_dict().items()})

    monkeypatch.setattr(IndividualNetworks, "before_task", spy)
    s, runner, logits = run_recording_logits(tmp_path, monkeypatch, "strategy=individual_networks", *RESNET,
                                             "train.epochs=1")
    old = pretrained["state"]
    assert len(starts) == 5
    for state in starts:
        assert state.keys() == old.keys() and all(torch.equal(state[k], old[k]) for k in old)
    for net in runner.strategy.model:  # and each was then fine-tuned
        assert not torch.equal(net.state_dict()["head.weight"], old["head.weight"])
    assert_earlier_logits_unchanged(logits)


# ----- storage per task, by hand ----------------------------------------------------------------

# mlp 64 -> 8 -> 6 -> 10 outputs, 5 tasks of 2 outputs
WEIGHTS = 64 * 8 + 8 * 6  # maskable body weights
BODY = 4 * (WEIGHTS + 8 + 6)  # float32 body: weights and biases
COPY = BODY + 4 * (6 * 10 + 10)  # the whole network
MASK = (64 * 8 + 7) // 8 + (8 * 6 + 7) // 8  # one bit per weight, packed per layer
HEAD = 4 * 2 * (6 + 1)  # a task's two head rows


@pytest.mark.parametrize("strategy,is_pretrained,per_task,base", [
    ("piggyback", True, [MASK + HEAD] * 5, BODY),
    ("piggyback", False, [BODY + HEAD] + [MASK + HEAD] * 4, 0),
    ("packnet", True, [MASK + HEAD] * 5, BODY),
    ("packnet", False, [BODY + MASK + HEAD] + [MASK + HEAD] * 4, 0),
    ("feature_extraction", True, [HEAD] * 5, BODY),
    ("individual_networks", True, [COPY] * 5, 0),
])
def test_storage_per_task_matches_a_hand_count(tmp_path, monkeypatch, strategy, is_pretrained, per_task, base):
    if is_pretrained:
        pretrain_backbones(monkeypatch)
    s = Runner(compose_cfg(*DATA, f"strategy={strategy}", *MLP, "train.epochs=1"), tmp_path).run()
    info = s["strategy_info"]
    assert info["copy_bytes"] == COPY == 2576
    assert info["storage_bytes_per_task"] == per_task and info["storage_base_bytes"] == base
    assert info["storage_vs_copy_per_task"] == [round(b / COPY, 6) for b in per_task]
    if strategy in ("piggyback", "packnet"):
        masks = info["mask_bytes_per_task"]
        assert masks == [0 if b == BODY + HEAD else MASK for b in per_task] and MASK == 70
        assert all(bits in (0.0, 1.0) for bits in info["mask_bits_per_weight"])  # 560 weights: 70 bytes = 1 bit each
    # logged after every task, over the tasks so far
    assert [len(log["strategy"]["storage_bytes_per_task"]) for log in s["train_log"]] == [1, 2, 3, 4, 5]


# ----- HAT and CPG still run on a pretrained backbone -------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["hat", "cpg"])
def test_hat_and_cpg_run_on_a_pretrained_backbone(tmp_path, monkeypatch, pretrained, strategy):
    s, runner, logits = run_recording_logits(tmp_path, monkeypatch, f"strategy={strategy}", *RESNET, "train.epochs=1",
                                             *OPTIMIZERS["sgd"])
    R = np.asarray(s["accuracy_matrix"])
    assert np.isfinite(R).all() and R.shape == (5, 5)
    for k in range(len(logits) - 1):
        for i in range(k + 1, len(logits)):
            assert torch.allclose(logits[i][k], logits[k][k], rtol=1e-5, atol=1e-5), (strategy, k, i)


# ----- end to end: torchvision's ResNet-18 from a weights file ------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["piggyback", "feature_extraction"])
def test_resnet18_with_a_weights_file_keeps_its_pretrained_body(tmp_path, monkeypatch, strategy):
    """backbone=resnet18 backbone.pretrained=imagenet backbone.weights=<file>: a file in torchvision's
    format (random weights, batch-norm statistics set away from their initial values)."""
    import torchvision

    g = torch.Generator().manual_seed(5)
    state = torchvision.models.resnet18(weights=None).state_dict()
    for k, v in state.items():
        if k.endswith("running_mean"):
            v.copy_(torch.randn(v.shape, generator=g) * 0.1)
        elif k.endswith("running_var"):
            v.copy_(torch.rand(v.shape, generator=g) + 0.5)
    torch.save(state, tmp_path / "resnet18.pth")
    built: dict = {}

    def build(node, where, **kwargs):
        obj = real_build(node, where, **kwargs)
        if where == "backbone":
            built["state"] = {k: v.clone() for k, v in obj.state_dict().items()}
            built["weights"] = obj.pretrained_weights
        return obj

    monkeypatch.setattr(runner_module, "build", build)
    s, runner, logits = run_recording_logits(
        tmp_path / "run", monkeypatch, f"strategy={strategy}", "backbone=resnet18", "backbone.pretrained=imagenet",
        f"backbone.weights={tmp_path / 'resnet18.pth'}", "dataset.max_train_per_class=8", "train.epochs=1",
        *(["strategy.task_batchnorm=false"] if strategy == "piggyback" else []), *OPTIMIZERS["sgd"])
    assert built["weights"] is not None
    old, now = built["state"], runner.strategy.model.state_dict()
    assert torch.equal(old["body.layer4.1.bn2.running_var"], state["layer4.1.bn2.running_var"])  # the file was loaded
    assert all(torch.equal(now[k], old[k]) for k in old if k.startswith("body."))
    if strategy == "piggyback":
        assert all(m is not None for m in runner.strategy.masks)
    assert_earlier_logits_unchanged(logits)
