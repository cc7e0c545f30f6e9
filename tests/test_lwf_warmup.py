"""LwF's warm-up (Li & Hoiem, TPAMI 2017, Sec. 3): the new head alone, everything else exactly fixed."""

from __future__ import annotations

import pytest
import torch

from cl_bench import CLBenchError
from cl_bench.runner import Runner
from cl_bench.strategies.lwf import LwF
from tests.conformance_cases import BACKBONES, OPTIMIZERS
from tests.conftest import compose_cfg


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_warm_up_moves_only_the_new_head_rows(optimizer, tmp_path, monkeypatch):
    seen = []
    real = LwF._warm_up

    def spy(self, task):
        before = {k: v.clone() for k, v in self.model.state_dict().items()}
        real(self, task)
        seen.append((task, before, {k: v.clone() for k, v in self.model.state_dict().items()}))

    monkeypatch.setattr(LwF, "_warm_up", spy)
    cfg = compose_cfg("strategy=lwf", "strategy.warmup_epochs=2", "scenario=task_il", "dataset.max_train_per_class=10",
                      "train.epochs=1", "checkpoint=false", "device.num_threads=1", *BACKBONES["resnet_bn"],
                      *OPTIMIZERS[optimizer])
    Runner(cfg, tmp_path).run()
    assert [task.id for task, _, _ in seen] == [1, 2, 3, 4]  # every task after the first
    for task, before, after in seen:
        for key in before:
            if not key.startswith("head."):  # body weights and batch-norm statistics
                assert torch.equal(before[key], after[key]), key
        rows = torch.tensor(task.outputs)
        others = torch.ones(len(before["head.weight"]), dtype=torch.bool)
        others[rows] = False
        for key in ("head.weight", "head.bias"):
            assert torch.equal(before[key][others], after[key][others]), key
            assert not torch.equal(before[key][rows], after[key][rows]), key


def test_warm_up_zero_is_the_default_and_bad_values_are_refused(tmp_path):
    assert LwF().warmup_epochs == 0
    with pytest.raises(CLBenchError, match="warmup_epochs"):
        LwF(warmup_epochs=-1)
    with pytest.raises(CLBenchError, match="domain_il"):
        Runner(compose_cfg("strategy=lwf", "strategy.warmup_epochs=1", "dataset=split_digits", "scenario=domain_il"),
               tmp_path).run()


def test_a_diverged_warm_up_fails_naming_its_learning_rate(tmp_path):
    with pytest.raises(CLBenchError, match="warm-up diverged in task 1.*strategy.warmup_lr"):
        Runner(compose_cfg("strategy=lwf", "scenario=task_il", "strategy.warmup_epochs=2", "strategy.warmup_lr=1e12",
                           "train.epochs=1", "dataset.max_train_per_class=10", "checkpoint=false"), tmp_path).run()
