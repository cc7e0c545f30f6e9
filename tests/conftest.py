"""Shared fixtures: real configs composed from conf/ with small overrides."""

from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

import cl_bench.config  # noqa: F401  (registers the schema)

CONF = files("cl_bench.conf")

# Under pytest-xdist every worker gets one torch thread (and so do the clbench processes the
# tests start): the workers already use every core, and the tests' small models gain nothing
# from intra-op threads that would spin-wait against the other workers.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

# The fast tier, `pytest -m "not slow"` (under 2 minutes on a 2-core machine): one quick test
# of each area, by node id (a file, a test, or a test's parametrisations); every other test is
# marked `slow` here, and so is every `exhaustive` one. `pytest` (CI) runs both tiers.
FAST_TIER = (
    "tests/test_metrics.py",
    "tests/test_buffer.py",
    "tests/test_distillation.py",
    "tests/test_backbones.py",
    "tests/test_runner.py",
    "tests/test_progress.py",
    "tests/test_report.py",
    "tests/test_training_controls.py",
    "tests/test_datasets.py",
    "tests/test_failures.py::test_bad_training_values_are_refused_before_training",
    "tests/test_failures.py::test_a_nan_step_is_caught_at_the_end_of_its_epoch",
    "tests/test_configs.py::test_misspelled_top_level_key_fails",
    "tests/test_configs.py::test_wrong_type_fails_naming_the_key",
    "tests/test_configs.py::test_unknown_strategy_argument_fails_naming_the_key",
    "tests/test_cli.py::test_unknown_command",
    "tests/test_cli.py::test_list_shows_groups_from_the_config_tree",
    "tests/test_cli.py::test_errors_exit_nonzero_with_one_clear_message[strategy=nope",
    "tests/test_bad_inputs.py::test_report_lists_an_empty_metrics_json_as_failed",
    "tests/test_regularization.py::test_importances_nonzero_and_finite_after_first_task",
    "tests/test_regularization.py::test_penalty_pulls_towards_the_anchor",
    "tests/test_replay.py::test_memory_never_exceeds_its_budget",
    "tests/test_isolation.py::test_packnet_masks_are_disjoint_and_cover_the_pruned_fraction",
    "tests/test_isolation.py::test_bad_hyperparameters_name_the_key",
    "tests/test_generative.py::test_models_are_sized_by_the_image_shape",
    "tests/test_generative.py::test_dgm_masks_are_binary_old_units_get_no_gradient_and_the_generator_grows",
    "tests/test_preemption.py::test_a_bad_checkpoint_every_is_refused_before_anything_runs",
    "tests/test_preemption.py::test_a_signal_outside_the_training_loop_stops_after_the_task",
    "tests/test_user_extension.py::test_python_api_runs_the_cli_code_path",
    "tests/test_sweeps.py::test_parallel_workers_get_their_own_gpu_round_robin",
    "tests/test_gpu_options.py::test_an_unknown_backend_is_refused_before_anything_runs",
    "tests/test_precision.py::test_a_step_with_inf_gradients_is_skipped_and_halves_the_scale",
    "tests/test_precision.py::test_every_step_of_a_task_sees_the_weights_the_previous_step_left",
    "tests/test_der.py::test_reservoir_reports_the_slots_it_wrote_and_the_logits_follow_them",
    "tests/test_der.py::test_step_loss_is_the_papers_equation_from_the_same_draws",
    "tests/test_der.py::test_bad_hyperparameters_are_refused_in_one_line",
    "tests/test_er_ace.py::test_incoming_loss_leaves_masked_logits_without_gradient_and_replay_reaches_them",
    "tests/test_xder.py::test_rescale_rule_on_a_constructed_example",
    "tests/test_xder.py::test_supcon_matches_its_definition",
    "tests/test_xder.py::test_memory_is_class_balanced_within_budget",
    "tests/test_xder.py::test_bad_hyperparameters_are_refused_naming_the_key",
    "tests/test_gdumb.py::test_greedy_sampler_follows_algorithm_1",
    "tests/test_gdumb.py::test_sgdr_schedule_matches_the_authors_loop",
    "tests/test_gdumb.py::test_final_network_depends_on_the_memory_alone",
    "tests/test_wa.py::test_loss_is_one_minus_lambda_ce_plus_lambda_kd_without_t_squared",
    "tests/test_podnet.py::test_pod_spatial_is_zero_for_identical_maps_and_equals_the_direct_formula",
    "tests/test_podnet.py::test_nca_loss_equals_the_authors_formula_and_is_shift_invariant",
    "tests/test_podnet.py::test_one_task_equals_plain_nca_training_of_the_lsc",
    "tests/test_lucir.py::test_margin_loss_ranks_the_ground_truth_against_the_top_k_new_classes",
    "tests/test_lucir.py::test_old_class_weights_are_unchanged_by_later_tasks",
    "tests/test_lucir.py::test_bad_hyperparameters_are_refused_naming_the_key",
    "tests/test_paper_tables.py::test_every_table_is_well_formed",
    "tests/test_paper_tables.py::test_an_unknown_table_is_refused_in_one_line",
    "tests/test_reproduce_experiments.py::test_every_paper_row_asks_for_what_its_experiment_sets[vandeven2019]",
    "tests/test_paper_tables_more.py::test_table_parses_with_unique_keys_and_values_in_range",
    "tests/test_dgm_experiments.py::test_experiment_carries_the_authors_settings",
    "tests/test_pretrained_backbones.py::test_wrong_files_are_refused_in_one_line_naming_the_file_and_the_fault",
    "tests/test_pretrained_backbones.py::test_missing_weights_are_one_line_naming_the_file_where_it_goes_and_the_fetch_command",
    "tests/test_pretrained_backbones.py::test_imagenet_weights_come_from_the_torch_hub_cache_under_torchvisions_file_name",
    "tests/test_sequence.py::test_default_sequence_is_digits_then_mnist5k_with_shifted_labels",
    "tests/test_finegrained_data.py::test_official_split_labels_and_pixels",
    "tests/test_finegrained_data.py::test_a_missing_annotation_file_is_one_line_naming_it",
    "tests/test_scene_data.py::test_mit_indoor_uses_exactly_the_official_lists",
    "tests/test_scene_data.py::test_cap_is_applied_to_the_file_list_before_decoding",
    "tests/test_sequence.py::test_bad_sequences_fail_in_one_line",
    "tests/test_experiments.py::test_experiment_carries_the_papers_settings_per_method",
    "tests/test_lwf_warmup.py::test_warm_up_zero_is_the_default_and_bad_values_are_refused",
    "tests/test_pretrained_isolation.py::test_storage_per_task_matches_a_hand_count",
)


def _in_fast_tier(nodeid: str) -> bool:
    return any(nodeid == p or nodeid.startswith((p + "::", p + "[")) for p in FAST_TIER)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("exhaustive") or not _in_fast_tier(item.nodeid):
            item.add_marker(pytest.mark.slow)


def conf_options(group: str) -> list[str]:
    return sorted(p.name[:-5] for p in CONF.joinpath(group).iterdir() if p.name.endswith(".yaml"))


def compose_cfg(*overrides: str):
    with initialize_config_module("cl_bench.conf", version_base="1.3"):
        return compose("config", overrides=["progress=false", *overrides])


def run(tmp_path: Path, *overrides: str, name: str = "run") -> dict:
    from cl_bench.runner import Runner

    return Runner(compose_cfg(*overrides), tmp_path / name).run()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models on small batches gain nothing from intra-op threads, and on a busy
    2-core machine two threads spin-wait; modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def run_cfg(tmp_path):
    def _run(*overrides: str, name: str = "run") -> dict:
        return run(tmp_path, *overrides, name=name)

    return _run


class Killed(Exception):
    """Stands for the process dying: raised when a chosen task starts training."""


def run_killed_and_resumed(tmp_path: Path, monkeypatch, overrides, kill_at_task: int) -> tuple[dict, dict]:
    """(uninterrupted run, run killed as task `kill_at_task` starts and then resumed on its folder).

    Checks on the way that the killed run left its checkpoint and no result files.
    """
    from cl_bench.runner import CHECKPOINT, Runner

    reference = Runner(compose_cfg(*overrides), tmp_path / "reference").run()
    original = Runner._train_task

    def die_at_task(self, task, bar):
        if task.id == kill_at_task:
            raise Killed()
        return original(self, task, bar)

    folder = tmp_path / "killed"
    monkeypatch.setattr(Runner, "_train_task", die_at_task)
    with pytest.raises(Killed):
        Runner(compose_cfg(*overrides), folder).run()
    assert (folder / CHECKPOINT).exists()
    assert not (folder / "metrics.json").exists()
    monkeypatch.setattr(Runner, "_train_task", original)
    resumed = Runner(compose_cfg(*overrides), folder).run()
    return reference, resumed


def spy_frozen_teacher(monkeypatch, strategy_cls, attribute: str) -> list:
    """Patch `strategy_cls.train_step` to assert, at every step that has one, that the
    teacher (`self.<attribute>`, the previous model) is in eval mode and that the step left
    its state (weights and batch-norm statistics) unchanged. Returns the list of checked steps."""
    import torch

    original, checked = strategy_cls.train_step, []

    def train_step(self, batch):
        teacher = getattr(self, attribute)
        before = None if teacher is None else {k: v.clone() for k, v in teacher.state_dict().items()}
        out = original(self, batch)
        if teacher is not None:
            assert not teacher.training
            after = teacher.state_dict()
            assert all(torch.equal(before[k], after[k]) for k in before)
            checked.append(1)
        return out

    monkeypatch.setattr(strategy_cls, "train_step", train_step)
    return checked
