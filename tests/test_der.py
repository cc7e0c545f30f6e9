"""DER and DER++ (Buzzega et al. 2020): the mechanism as exact invariants, through the Runner.

- each slot's stored logits are bit for bit the logits the network produced for that
  sample in the step that inserted it, and they (and the sample) never change until the
  slot is overwritten, checked slot by slot after every later step and task;
- the step's loss is Eq. 6 / Eq. 7 recomputed by hand from the same memory draws;
- alpha=0 (DER), alpha=beta=0 (DER++) and memory_size=0 are finetune bit for bit (matrix
  and weights, batch-norm backbone, SGD with momentum and weight decay), and DER++ with
  alpha=0 never reads the stored logits (NaN logits change nothing);
- the logit memory draws exactly as the shared reservoir; budget; resume; bad values.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cl_bench import CLBenchError
from cl_bench.runner import Runner
from cl_bench.strategies.buffer import MemoryBuffer
from cl_bench.strategies.der import DER, DERpp, LogitMemory
from tests.conftest import compose_cfg, run_killed_and_resumed

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ("dataset=split_digits", "dataset.max_train_per_class=10", "train.epochs=2", "train.batch_size=8",
        "checkpoint=false", "seed=1")
BN = ("backbone=reduced_resnet18", "backbone.nf=4")
SGD = ("train.optimizer=sgd", "train.lr=0.05", "train.momentum=0.9", "train.weight_decay=5e-4")


def runner_for(tmp_path, *overrides, name="run") -> Runner:
    return Runner(compose_cfg(*TINY, *overrides), tmp_path / name)


@pytest.mark.parametrize("backbone", [(), BN], ids=["mlp", "resnet_bn"])
def test_stored_logits_are_the_insertion_logits_and_never_change(backbone, tmp_path, monkeypatch):
    ledger: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # slot -> (raw sample, logits) written there
    checks = {"written": 0, "kept": 0}
    expected = {}  # the logits of the step in progress, from a copy of the network
    original_step, original_add = DER.train_step, LogitMemory.add

    def check_ledger(memory: LogitMemory) -> None:
        for slot, (raw, logits) in ledger.items():
            assert torch.equal(memory.x[slot], raw) and torch.equal(memory.logits[slot], logits), f"slot {slot} changed"
            checks["kept"] += 1

    def train_step(self, batch):
        check_ledger(self.memory)  # nothing changed since the last write, whatever training did
        with torch.no_grad():  # the network as the step sees it (a copy: its BN statistics stay untouched)
            expected["logits"] = copy.deepcopy(self.model)(batch.x)
        return original_step(self, batch)

    def add(self, x, y, logits, task_id, generator):
        slots, rows = original_add(self, x, y, logits, task_id, generator)
        for slot, row in zip(slots.tolist(), rows.tolist()):
            assert torch.equal(self.logits[slot], expected["logits"][row]), "stored logits differ from the insertion forward"
            ledger[slot] = (self.x[slot].clone(), self.logits[slot].clone())
            checks["written"] += 1
        check_ledger(self)
        return slots, rows

    monkeypatch.setattr(DER, "train_step", train_step)
    monkeypatch.setattr(LogitMemory, "add", add)
    runner = runner_for(tmp_path, "strategy=der", "strategy.memory_size=30", *backbone, *SGD)
    runner.run()
    check_ledger(runner.strategy.memory)  # after the last task
    assert len(ledger) == 30 and checks["written"] > 30 and checks["kept"] > 1000


def _replay_draw(strategy, gen: torch.Generator, n: int):
    index = torch.randperm(len(strategy.memory), generator=gen)[:n]
    x = strategy.stream.transform(strategy.memory.x[index], train=True, generator=gen)
    return x, index


@pytest.mark.parametrize("name,alpha,beta", [("der", 0.2, None), ("derpp", 0.2, 1.0), ("derpp", 0.0, 1.0)])
def test_step_loss_is_the_papers_equation_from_the_same_draws(name, alpha, beta, tmp_path, monkeypatch):
    """Eq. 6 (DER), Eq. 7 (DER++: two independent draws) and, with alpha=0, replay of labels only."""
    cls = DERpp if name == "derpp" else DER
    original, compared = cls.train_step, []

    def train_step(self, batch):
        if len(self.memory) == 0:
            return original(self, batch)
        gen = torch.Generator()
        gen.set_state(self.generator.get_state())
        n, model = self.replay_batch_size or len(batch.y), copy.deepcopy(self.model)
        with torch.no_grad():
            expected = F.cross_entropy(model(batch.x), batch.y)
            if alpha > 0:
                x, index = _replay_draw(self, gen, n)
                expected = expected + alpha * F.mse_loss(model(x), self.memory.logits[index])
            if beta:
                x, index = _replay_draw(self, gen, n)
                expected = expected + beta * F.cross_entropy(model(x), self.memory.y[index])
        out = original(self, batch)
        assert torch.allclose(out["loss"], expected, rtol=1e-6, atol=1e-7), (out["loss"], expected)
        compared.append(float(out["loss"]))
        return out

    monkeypatch.setattr(cls, "train_step", train_step)
    extra = (f"strategy.alpha={alpha}",) + ((f"strategy.beta={beta}", "strategy.replay_batch_size=12") if beta else ())
    runner_for(tmp_path, f"strategy={name}", *extra).run()
    assert len(compared) > 10


OFF = {
    "der alpha=0": ("strategy=der", "strategy.alpha=0"),
    "derpp alpha=beta=0": ("strategy=derpp", "strategy.alpha=0", "strategy.beta=0"),
    "der memory_size=0": ("strategy=der", "strategy.memory_size=0"),
}


@pytest.fixture(scope="module")
def finetune_bn(tmp_path_factory):
    runner = Runner(compose_cfg(*TINY, *BN, *SGD, "strategy=finetune"), tmp_path_factory.mktemp("finetune"))
    return runner.run(), runner


@pytest.mark.parametrize("off", list(OFF))
def test_switched_off_equals_finetune_bit_for_bit(off, finetune_bn, tmp_path):
    reference, ref_runner = finetune_bn
    runner = runner_for(tmp_path, *BN, *SGD, *OFF[off])
    summary = runner.run()
    assert np.array_equal(np.asarray(summary["accuracy_matrix"]), np.asarray(reference["accuracy_matrix"]))
    mine, theirs = runner.strategy.model.state_dict(), ref_runner.strategy.model.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs), f"{off}: weights or BN statistics differ"
    filled = summary["strategy_info"]["exemplars"]
    assert filled == 0 if "memory_size=0" in off else filled > 0  # with a weight 0 the memory still fills


def test_derpp_with_alpha_zero_never_reads_the_stored_logits(tmp_path, monkeypatch):
    """DER++ with alpha=0 is replay of labels: stored logits set to NaN change nothing."""
    overrides = ("strategy=derpp", "strategy.alpha=0", *SGD)
    reference = runner_for(tmp_path, *overrides, name="ref").run()
    original = LogitMemory.add

    def poisoned(self, *args):
        out = original(self, *args)
        self.logits.fill_(float("nan"))
        return out

    monkeypatch.setattr(LogitMemory, "add", poisoned)
    summary = runner_for(tmp_path, *overrides, name="nan").run()
    assert np.array_equal(np.asarray(summary["accuracy_matrix"]), np.asarray(reference["accuracy_matrix"]))
    finetune = runner_for(tmp_path, "strategy=finetune", *SGD, name="ft").run()
    assert summary["metrics"]["acc"] > finetune["metrics"]["acc"] + 0.1  # the label replay is really on


def test_reservoir_reports_the_slots_it_wrote_and_the_logits_follow_them():
    """MemoryBuffer.add_reservoir returns (slots, rows): exactly the slots whose content changed,
    each holding the batch row given (the last one in the batch for a repeated slot); DER's
    memory stores those rows' logits in those slots and draws like a plain reservoir."""
    torch.manual_seed(0)
    shared, mine = MemoryBuffer(7), LogitMemory(7)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for step in range(12):
        x = torch.randint(0, 255, (5, 1, 2, 2), dtype=torch.uint8)
        y = torch.randint(0, 10, (5,))
        before = None if shared.x is None else shared.x.clone()
        written, written_rows = shared.add_reservoir(x, y, step, g1)
        assert len(set(written.tolist())) == len(written)
        assert torch.equal(shared.x[written], x[written_rows]) and (shared.task[written] == step).all()
        untouched = torch.ones(len(shared.x), dtype=torch.bool)
        untouched[written] = False
        if before is not None and len(before) == len(shared.x):  # (storage grows by doubling at first)
            assert torch.equal(shared.x[untouched], before[untouched])
        logits = torch.randn(5, 10)
        slots, rows = mine.add(x, y, logits, step, g2)
        assert torch.equal(slots, written) and torch.equal(rows, written_rows)
        assert torch.equal(mine.logits[slots], logits[rows])
        for name in ("x", "y", "task", "rank"):
            assert torch.equal(getattr(shared, name), getattr(mine, name)), name
        assert (shared.size, shared.seen) == (mine.size, mine.seen)
        assert torch.equal(g1.get_state(), g2.get_state())


def test_memory_stays_within_budget_and_counts_the_logits(tmp_path, monkeypatch):
    original, sizes = LogitMemory.add, []

    def checked(self, *args):
        out = original(self, *args)
        sizes.append(len(self))
        assert len(self) <= 33 and len(self.x) <= 33 and len(self.logits) <= 33
        return out

    monkeypatch.setattr(LogitMemory, "add", checked)
    s = runner_for(tmp_path, "strategy=derpp", "strategy.memory_size=33").run()
    assert max(sizes) == 33
    info = s["strategy_info"]
    assert info["exemplars"] == 33 and info["memory_size"] == 33
    assert info["bytes"] == 33 * (64 + 3 * 8 + 10 * 4)  # 8x8 uint8 image, label/task/rank, 10 float32 logits


@pytest.mark.parametrize("strategy", ["der", "derpp"])
def test_resume_after_kill_gives_the_same_matrix(strategy, tmp_path, monkeypatch):
    overrides = (f"strategy={strategy}", "train.epochs=1", "dataset.max_train_per_class=20", "seed=3",
                 "strategy.memory_size=50")
    reference, resumed = run_killed_and_resumed(tmp_path, monkeypatch, overrides, kill_at_task=2)
    assert np.array_equal(np.asarray(resumed["accuracy_matrix"]), np.asarray(reference["accuracy_matrix"]))
    assert resumed["strategy_info"] == reference["strategy_info"]


@pytest.mark.parametrize("scenario", ["task_il", "domain_il"])
def test_runs_in_task_and_domain_il(scenario, tmp_path):
    s = runner_for(tmp_path, "strategy=derpp", f"scenario={scenario}").run()
    R = np.asarray(s["accuracy_matrix"])
    assert np.isfinite(R).all() and s["strategy_info"]["exemplars"] > 0
    assert R[-1].mean() > 0.6


@pytest.mark.parametrize(
    "override,key",
    [
        ("strategy.alpha=-0.1", "strategy.alpha"),
        ("strategy.alpha=nan", "strategy.alpha"),
        ("strategy.beta=-1", "strategy.beta"),
        ("strategy.replay_batch_size=0", "strategy.replay_batch_size"),
        ("strategy.memory_size=-5", "strategy.memory_size"),
    ],
)
def test_bad_hyperparameters_are_refused_in_one_line(override, key, tmp_path, monkeypatch):
    monkeypatch.setattr(Runner, "_train_task", lambda *a: pytest.fail("training started"))
    with pytest.raises(CLBenchError) as err:
        runner_for(tmp_path, "strategy=derpp", override).run()
    assert key in str(err.value) and "\n" not in str(err.value)
