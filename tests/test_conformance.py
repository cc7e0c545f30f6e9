"""Conformance matrix: every strategy (conf/strategy/) x backbones with and without batch
norm x optimizers (SGD with momentum and weight decay, AdamW, Adam; for the families with
frozen parts also SGD whose momentum is carried across tasks) x the scenarios it
supports, on tiny data in real formats (scikit-learn's digits; CIFAR-10 pickle batches
written by tests/real_format.py), asserting invariants rather than accuracies.

Each case runs the real `Runner` with the strategy's shipped defaults (tables in
tests/conformance_cases.py) and checks, while it runs:

- it either runs to the end, or refuses before the first training step with a one-line
  `CLBenchError` (e.g. a masked method on a backbone without the structure it needs);
  never a traceback mid-run; every strategy runs on the default MLP;
- every training step returns finite losses, and after every task all weights and
  buffers of the model are finite; the accuracy matrix is finite;
- memories stay within budget (`summary()`'s `exemplars` <= `memory_size`, the buffer
  itself, VCL's coresets), checked after every step and every task;
- parameter isolation (packnet, cpg, hat, piggyback, pnn, den, individual_networks,
  feature_extraction): each earlier task's logits on a fixed batch of its test inputs,
  recorded right after it was trained, are unchanged after every later task (logits, not
  accuracy, which saturates);
- DGM (dgm_w, dgm_a): each earlier task's generated samples for fixed latent codes and
  labels are unchanged after every later task;
- DGR, MeRGAN: the frozen generator (and DGR's frozen solver) that a task replays from
  gives the same outputs for fixed inputs before and after that task trains.

`test_protection_off_equals_finetune`: a strategy with its protection switched off
(PROTECTION_OFF) gives finetune's accuracy matrix and final weights on the same stream
and seed. Strategies without such a switch say why in the table.

The default tier (see `is_fast`) runs in CI; the rest is marked `exhaustive`.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from cl_bench import CLBenchError
from cl_bench.runner import Runner
from tests.conformance_cases import (
    BACKBONES,
    BASELINE,
    COST,
    DATASETS,
    FAMILY,
    GENERATIVE,
    GENERATIVE_MASKED,
    ISOLATION,
    OPTIMIZERS,
    PROTECTION_OFF,
    PROTECTION_OFF_SCENARIO,
    PROTOCOL,
    conformance_cases,
    is_fast,
    protection_off_cases,
    protection_off_is_fast,
    strategies,
    strategy_scenarios,
)
from tests.conftest import compose_cfg

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# logits/samples of an earlier task must stay the same up to float noise
ATOL, RTOL = 1e-5, 1e-5
PROBE_SAMPLES = 32


def _param(case: tuple, fast: bool):
    return pytest.param(*case, id="-".join(case), marks=() if fast else pytest.mark.exhaustive)


# ----- the tables cover every strategy ------------------------------------------------------


@pytest.mark.parametrize("strategy", strategies())
def test_strategy_has_conformance_entries(strategy):
    missing = [name for name, table in (("FAMILY", FAMILY), ("PROTECTION_OFF", PROTECTION_OFF)) if strategy not in table]
    assert not missing, (
        f"strategy {strategy!r} (conf/strategy/{strategy}.yaml) has no entry in {', '.join(missing)} of "
        "tests/conformance_cases.py: add it (its family, and its protection-off overrides or why it has none)"
    )
    assert strategy_scenarios(strategy), f"{strategy} declares no scenario"


def test_tables_name_only_existing_strategies():
    stale = sorted((set(FAMILY) | set(PROTECTION_OFF) | set(COST)) - set(strategies()))
    assert not stale, f"tests/conformance_cases.py names strategies without a conf/strategy/ file: {stale}"


# ----- the probing runner -------------------------------------------------------------------


class ConformanceRunner(Runner):
    """The real Runner, watched: every train step's outputs, every task's weights, memory,
    and the family invariant (earlier tasks' logits / generated samples)."""

    def __init__(self, cfg, output_dir: Path, family: str) -> None:
        super().__init__(cfg, output_dir)
        self.family = family
        self.steps = 0
        self.current_task = -1
        self.reference: dict[int, torch.Tensor] = {}  # task -> logits or samples right after it
        self.probe_inputs: dict[int, tuple] = {}

    def build(self) -> None:
        super().build()
        strategy = self.strategy
        train_step = strategy.train_step

        def watched_step(batch):
            self.steps += 1
            out = train_step(batch)
            assert isinstance(out, dict) and "loss" in out, f"train_step must return a dict with 'loss', got {out!r}"
            for key, value in out.items():
                value = torch.as_tensor(value)
                assert torch.isfinite(value).all(), (
                    f"train step {self.steps} (task {self.current_task}) returned non-finite {key}={value}"
                )
            self.check_memory(f"after train step {self.steps} of task {self.current_task}")
            return out

        strategy.train_step = watched_step

    def _train_task(self, task, bar) -> dict:
        self.current_task = task.id
        frozen = self.frozen_memory() if self.family == GENERATIVE else {}
        log = super()._train_task(task, bar)
        where = f"after task {task.id}"
        self.check_weights(where)
        self.check_memory(where, log["strategy"])
        if self.family == ISOLATION:
            self.check_isolation(task)
        elif self.family == GENERATIVE_MASKED:
            self.check_generated(task)
        for name, (module, inputs, before) in frozen.items():
            with torch.inference_mode():
                after = module(*inputs)
            _assert_unchanged(before, after, f"the frozen {name}'s outputs while training task {task.id}")
        return log

    # ----- invariants -------------------------------------------------------------------------
    def check_weights(self, where: str) -> None:
        for name, t in self.strategy.model.state_dict().items():
            if t.is_floating_point():
                assert torch.isfinite(t).all(), f"{where}: model tensor {name} is not finite"

    def check_memory(self, where: str, summary: dict | None = None) -> None:
        strategy = self.strategy
        memory = getattr(strategy, "memory", None)
        if memory is not None and hasattr(memory, "capacity"):
            assert len(memory) <= memory.capacity, f"{where}: {len(memory)} samples stored, budget {memory.capacity}"
            if getattr(memory, "x", None) is not None:
                assert len(memory.x) <= memory.capacity, f"{where}: memory tensor holds {len(memory.x)} rows"
        if summary is None:
            return
        if memory is not None and hasattr(memory, "capacity"):
            missing = {"memory_size", "exemplars", "bytes"} - set(summary)
            assert not missing, f"{where}: a strategy with a memory must report {sorted(missing)} in summary()"
        if "exemplars" in summary and "memory_size" in summary:
            assert summary["exemplars"] <= summary["memory_size"], f"{where}: summary {summary}"
            per_class = summary.get("exemplars_per_class") or {}
            assert sum(per_class.values()) == summary["exemplars"], f"{where}: summary {summary}"
        if "coreset_samples" in summary:
            budget = getattr(strategy, "coreset_size") * (self.current_task + 1)
            assert summary["coreset_samples"] <= budget, f"{where}: {summary['coreset_samples']} coreset samples > {budget}"

    @torch.inference_mode()
    def check_isolation(self, task) -> None:
        """Record the new task's logits (its own outputs, those it is evaluated on) on a fixed
        batch of its test inputs; every earlier task's must be unchanged."""
        strategy, stream = self.strategy, self.stream
        strategy.set_training(False)  # what `evaluate` does right after this

        def logits(k: int) -> torch.Tensor:
            outputs = torch.tensor(stream.tasks[k].outputs, device=strategy.device)
            scores = strategy.predict(self.probe_inputs[k], k if stream.task_id_at_test else None)
            return scores[:, outputs]

        self.probe_inputs[task.id] = stream.transform(task.test.x[:PROBE_SAMPLES].to(strategy.device))
        self.reference[task.id] = logits(task.id).clone()
        for k in range(task.id):
            _assert_unchanged(self.reference[k], logits(k), f"task {k}'s logits after training task {task.id}")

    @torch.inference_mode()
    def frozen_memory(self) -> dict:
        """DGR / MeRGAN: the frozen snapshots the current task replays from (G_{t-1}, S_{t-1}),
        with fixed inputs and their outputs now; they must not change while the task trains."""
        strategy, out = self.strategy, {}
        g = torch.Generator().manual_seed(7)
        generator = getattr(strategy, "prev_generator", None)
        if generator is not None:
            net = getattr(generator, "decoder", generator)  # a VAE replays through its decoder
            z = torch.randn(PROBE_SAMPLES, net.latent_dim, generator=g).to(self.device)
            classes = getattr(net, "num_classes", 0)
            inputs = (z, (torch.arange(PROBE_SAMPLES) % classes).to(self.device)) if classes else (z,)
            out["prev_generator"] = (net, inputs, net(*inputs).clone())
        solver = getattr(strategy, "prev_solver", None)
        if solver is not None:
            x = self.stream.transform(self.stream.tasks[0].test.x[:PROBE_SAMPLES].to(self.device))
            out["prev_solver"] = (solver, (x,), solver(x).clone())
        return out

    @torch.inference_mode()
    def check_generated(self, task) -> None:
        """DGM: samples of each past task for fixed (z, label) never change."""
        gen = self.strategy.generator
        g = torch.Generator().manual_seed(1000 + task.id)
        outputs = torch.tensor(task.outputs)
        y = outputs[torch.arange(PROBE_SAMPLES) % len(outputs)].to(self.device)
        z = torch.randn(PROBE_SAMPLES, gen.latent_dim, generator=g).to(self.device)
        self.probe_inputs[task.id] = (z, y)
        self.reference[task.id] = gen(z, y, task.id).detach().clone()
        for k in range(task.id):
            now = gen(*self.probe_inputs[k], k)
            _assert_unchanged(self.reference[k], now, f"task {k}'s generated samples after training task {task.id}")


def _assert_unchanged(before: torch.Tensor, after: torch.Tensor, what: str) -> None:
    assert before.shape == after.shape, f"{what}: shape {tuple(before.shape)} -> {tuple(after.shape)}"
    finite = torch.isfinite(before)
    same_inf = torch.equal(finite, torch.isfinite(after)) and torch.equal(before[~finite], after[~finite])
    if not (same_inf and torch.allclose(before[finite], after[finite], rtol=RTOL, atol=ATOL)):
        diff = (before[finite] - after[finite]).abs().max().item() if same_inf else math.inf
        raise AssertionError(f"{what} changed: max |difference| {diff:.3g} (tolerance atol={ATOL}, rtol={RTOL})")


# ----- data ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_overrides(tmp_path_factory):
    from tests.real_format import prepare

    cache: dict[str, tuple[str, ...]] = {}

    def get(dataset: str) -> tuple[str, ...]:
        if dataset not in cache:
            name = DATASETS[dataset][0].split("=", 1)[1]
            files = prepare(name, tmp_path_factory.mktemp(f"data-{dataset}"))
            cache[dataset] = (*DATASETS[dataset], *files)
        return cache[dataset]

    return get


def overrides(strategy, backbone, optimizer, scenario, data: tuple[str, ...]) -> tuple[str, ...]:
    return (
        *PROTOCOL, *data, *BACKBONES[backbone], *OPTIMIZERS[optimizer], f"scenario={scenario}",
        f"strategy={strategy}", *COST.get(strategy, ()),
    )


def run_case(folder: Path, family: str, *args: str) -> tuple[dict | None, ConformanceRunner, str | None]:
    """(summary or None, runner, refusal message or None)."""
    runner = ConformanceRunner(compose_cfg(*args), folder, family)
    try:
        return runner.run(), runner, None
    except CLBenchError as exc:
        message = str(exc)
        assert runner.steps == 0, (
            f"CLBenchError mid-run, after {runner.steps} training steps (task {runner.current_task}); a "
            f"refusal must come before any training: {message}"
        )
        assert message and "\n" not in message.strip(), f"a refusal must be one line, got: {message!r}"
        return None, runner, message


# ----- the matrix --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "strategy,backbone,optimizer,scenario,dataset",
    [_param(case, is_fast(*case)) for case in conformance_cases()],
)
def test_conformance(strategy, backbone, optimizer, scenario, dataset, data_overrides, tmp_path):
    if strategy not in FAMILY:
        pytest.fail(f"{strategy} has no FAMILY entry in tests/conformance_cases.py: add it")
    args = overrides(strategy, backbone, optimizer, scenario, data_overrides(dataset))
    summary, runner, refusal = run_case(tmp_path / "run", FAMILY[strategy], *args)
    if refusal is not None:
        assert backbone != "mlp", f"{strategy} refuses the default MLP backbone: {refusal}"
        return  # refused before training with one line: conforms
    R = np.asarray(summary["accuracy_matrix"])
    assert np.isfinite(R).all(), R
    assert runner.steps > 0
    if FAMILY[strategy] in (ISOLATION, GENERATIVE_MASKED):
        assert len(runner.reference) == len(runner.stream), "every task was probed"


# ----- protection off = finetune ----------------------------------------------------------------


@pytest.fixture(scope="module")
def finetune_runs(tmp_path_factory):
    cache: dict[tuple, tuple[dict, Runner]] = {}

    def get(args: tuple[str, ...]) -> tuple[dict, Runner]:
        if args not in cache:
            summary, runner, refusal = run_case(tmp_path_factory.mktemp("finetune"), BASELINE, *args, "strategy=finetune")
            assert refusal is None, refusal
            cache[args] = (summary, runner)
        return cache[args]

    return get


@pytest.mark.parametrize(
    "strategy,backbone,optimizer,scenario",
    [_param(case, protection_off_is_fast(*case)) for case in protection_off_cases()],
)
def test_protection_off_equals_finetune(strategy, backbone, optimizer, scenario, data_overrides, finetune_runs, tmp_path):
    common = (
        *PROTOCOL, *data_overrides("digits"), *BACKBONES[backbone], *OPTIMIZERS[optimizer], f"scenario={scenario}",
        *PROTECTION_OFF_SCENARIO.get((strategy, scenario), ()),
    )
    off = PROTECTION_OFF[strategy]
    summary, runner, refusal = run_case(
        tmp_path / "run", FAMILY[strategy], *common, f"strategy={strategy}", *COST.get(strategy, ()), *off
    )
    if refusal is not None:
        assert backbone != "mlp", f"{strategy} refuses the default MLP backbone: {refusal}"
        pytest.skip(f"{strategy} refuses backbone {backbone} (checked by test_conformance): {refusal}")
    reference, ref_runner = finetune_runs(common)
    R, R_ft = np.asarray(summary["accuracy_matrix"]), np.asarray(reference["accuracy_matrix"])
    assert np.array_equal(R, R_ft), f"{strategy} with {' '.join(off)} differs from finetune:\n{R}\n{R_ft}"
    mine = dict(runner.strategy.model.named_parameters())
    theirs = dict(ref_runner.strategy.model.named_parameters())
    assert mine.keys() == theirs.keys(), f"{strategy}'s model has other parameters than finetune's"
    for name, p in mine.items():
        assert torch.allclose(p, theirs[name], rtol=1e-5, atol=1e-6), (
            f"{strategy} with {' '.join(off)}: weight {name} differs from finetune's by "
            f"{(p - theirs[name]).abs().max().item():.3g}"
        )
