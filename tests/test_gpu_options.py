"""device.channels_last and train.compile, checked on the CPU (both work there).

- channels_last: the model's 4-D weights and every image batch the strategy sees are in
  channels-last memory format, `metrics.json` records it, and the run equals the default
  layout's up to float rounding (convolution kernels sum in another order).
- compile: with torch.compile's `eager` backend (dynamo traces the model, the graph runs
  the same kernels), a run equals the uncompiled run exactly; strategies whose model
  changes shape run eagerly with a one-line warning; an unknown backend is refused before
  anything runs. The inductor backend (generated C++ code) is exercised in the slow tier.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cl_bench import CLBenchError
from cl_bench.runner import Runner
from tests.conftest import compose_cfg

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ("dataset=split_digits", "dataset.max_train_per_class=10", "dataset.num_tasks=2", "train.epochs=1",
        "train.batch_size=16", "checkpoint=false", "seed=0")
CONV = ("backbone=reduced_resnet18", "backbone.nf=4", "train.optimizer=sgd", "train.lr=0.05",
        "train.momentum=0.9", "train.weight_decay=5e-4")


def _run(tmp_path, name, *overrides):
    runner = Runner(compose_cfg(*TINY, *overrides), tmp_path / name)
    summary = runner.run()
    return runner, summary


def test_channels_last_puts_weights_and_batches_in_nhwc_and_matches_the_default_layout(tmp_path):
    runner, summary = _run(tmp_path, "nhwc", *CONV, "strategy=er", "device.channels_last=true")
    base_runner, base = _run(tmp_path, "nchw", *CONV, "strategy=er")
    assert summary["channels_last"] is True and base["channels_last"] is False
    convs = [p for p in runner.strategy.model.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    x = runner.stream.transform(runner.stream.tasks[0].train.x[:4])
    assert x.is_contiguous(memory_format=torch.channels_last) and x.stride()[1] == 1  # NHWC strides
    a, b = np.array(summary["accuracy_matrix"]), np.array(base["accuracy_matrix"])
    assert np.abs(a - b).max() <= 0.1, (a, b)
    # same function: the trained NHWC model and its NCHW copy give the same logits up to
    # rounding (the runs themselves drift apart by ~1e-3 in the weights over their SGD steps)
    model = runner.strategy.model.eval()
    copy = type(model)((1, 8, 8), model.head.out_features, nf=4).eval()
    copy.load_state_dict(model.state_dict())
    assert all(p.is_contiguous() for p in copy.parameters())
    plain_x = x.contiguous()
    assert torch.allclose(model(x), copy(plain_x), atol=1e-5, rtol=1e-5)


def test_channels_last_leaves_feature_inputs_alone(tmp_path):
    runner, summary = _run(tmp_path, "mlp", "strategy=finetune", "device.channels_last=true")
    _, base = _run(tmp_path, "base", "strategy=finetune")
    assert summary["accuracy_matrix"] == base["accuracy_matrix"]


@pytest.mark.parametrize("strategy", ["finetune", "lwf", "er"])
def test_compile_with_the_eager_backend_gives_the_uncompiled_run(strategy, tmp_path):
    compiled_runner, compiled = _run(tmp_path, "compiled", *CONV, f"strategy={strategy}", "train.compile=true",
                                     "train.compile_backend=eager")
    plain_runner, plain = _run(tmp_path, "plain", *CONV, f"strategy={strategy}")
    assert compiled["compiled"] is True and plain["compiled"] is False
    assert compiled["accuracy_matrix"] == plain["accuracy_matrix"]
    assert [e["mean_loss"] for e in compiled["train_log"]] == [e["mean_loss"] for e in plain["train_log"]]
    for p, q in zip(compiled_runner.strategy.model.state_dict().values(), plain_runner.strategy.model.state_dict().values()):
        assert torch.equal(p, q)
    # state dicts (and so checkpoints) keep the backbone's own keys
    assert list(compiled_runner.strategy.model.state_dict()) == list(plain_runner.strategy.model.state_dict())


def test_a_growing_model_runs_eagerly_with_one_warning(tmp_path):
    _, summary = _run(tmp_path, "pnn", "strategy=pnn", "scenario=task_il", "train.compile=true",
                      "train.compile_backend=eager")
    assert summary["compiled"] is False
    assert any("train.compile: PNN changes its model's shape" in w for w in summary["warnings"])


def test_an_unknown_backend_is_refused_before_anything_runs(tmp_path):
    from cl_bench.config import preflight

    with pytest.raises(CLBenchError, match="train.compile_backend='nope' is not a torch.compile backend"):
        preflight(compose_cfg(*TINY, "train.compile=true", "train.compile_backend=nope"))


def test_compile_with_inductor_stays_close_to_eager(tmp_path):
    """Generated code reorders floating-point sums: close, not bit-equal."""
    _, compiled = _run(tmp_path, "inductor", "strategy=finetune", "train.compile=true")
    _, plain = _run(tmp_path, "plain", "strategy=finetune")
    assert compiled["compiled"] is True
    a, b = np.array(compiled["accuracy_matrix"]), np.array(plain["accuracy_matrix"])
    assert np.abs(a - b).max() <= 0.1
