"""Tables of the conformance suite (tests/test_conformance.py): every strategy in
conf/strategy/ must have an entry in FAMILY and PROTECTION_OFF; backbones, optimizers and
data in the real formats; which combinations run in the fast tier.

The suite runs the SHIPPED strategy defaults. It only shrinks the cost of the protocol
(PROTOCOL: 1 epoch, 10 training samples per class, small backbone widths) and, per
strategy, knobs that cost time and do not decide the protection (COST).
"""

from __future__ import annotations

import functools
from typing import Union

from omegaconf import OmegaConf

from tests.conftest import CONF, conf_options

# ----- families: which invariant each strategy must keep ----------------------------------

ISOLATION = "isolation"  # earlier tasks' logits unchanged after later tasks
GENERATIVE_MASKED = "generative_masked"  # DGM: earlier tasks' samples unchanged
GENERATIVE = "generative"
REPLAY = "replay"
REGULARISATION = "regularisation"
BASELINE = "baseline"
# DEN: selective retraining under Eq. 4's drift penalty, then splitting of (at most
# expand_units) drifted units: earlier tasks' logits may move within that bound by design
# (Yoon et al. 2018, Sec. 3.3), so no exact-logits invariant; its cap and frozen biases are
# tested in tests/test_isolation.py
BOUNDED_DRIFT = "bounded_drift"

FAMILY = {
    "finetune": BASELINE,
    "joint": BASELINE,
    "ewc": REGULARISATION,
    "online_ewc": REGULARISATION,
    "si": REGULARISATION,
    "mas": REGULARISATION,
    "rwalk": REGULARISATION,
    "lwf": REGULARISATION,
    "vcl": REGULARISATION,
    "ags_cl": REGULARISATION,
    "er": REPLAY,
    "gem": REPLAY,
    "agem": REPLAY,
    "icarl": REPLAY,
    "eeil": REPLAY,
    "bic": REPLAY,
    "der": REPLAY,
    "derpp": REPLAY,
    "er_ace": REPLAY,
    "gdumb": REPLAY,
    "wa": REPLAY,
    "lucir": REPLAY,
    "xder": REPLAY,
    "podnet": REPLAY,
    "dgr": GENERATIVE,
    "mergan": GENERATIVE,
    "dgm_w": GENERATIVE_MASKED,
    "dgm_a": GENERATIVE_MASKED,
    "packnet": ISOLATION,
    "cpg": ISOLATION,
    "hat": ISOLATION,
    "piggyback": ISOLATION,
    "pnn": ISOLATION,
    "den": BOUNDED_DRIFT,
    "individual_networks": ISOLATION,
    "feature_extraction": ISOLATION,
}

# ----- protection off: overrides under which a strategy must equal finetune ------------------
# A tuple of overrides, or a string saying why the strategy has no such switch.
# Both runs (the strategy with these overrides, and finetune) get the same protocol,
# backbone, optimizer, scenario and seed, and must give the same accuracy matrix and
# the same final weights (float tolerance).

NO_SWITCH = str
PROTECTION_OFF: dict[str, Union[tuple[str, ...], NO_SWITCH]] = {
    "finetune": "the reference itself",
    "joint": "not a protection but the data: it trains on the union of all seen tasks by definition",
    "ewc": ("strategy.ewc_lambda=0",),
    "online_ewc": ("strategy.ewc_lambda=0",),
    "si": ("strategy.c=0",),
    "mas": ("strategy.mas_lambda=0",),
    "rwalk": ("strategy.rwalk_lambda=0",),
    # class-IL: LwF's new-task cross-entropy covers the classes seen so far by design (van de
    # Ven & Tolias's code), i.e. finetune with train.active_classes=true; both runs get it
    "lwf": ("strategy.alpha=0",),
    "vcl": "a Bayesian MLP trained on the ELBO with the previous posterior as prior; no setting makes it "
    "a point-estimate network trained on cross-entropy",
    "ags_cl": "lamb=0 mu=0 rho=0 turns off the penalties and re-initialisation, but Sec. 3.3's structural step "
    "(zeroing, then holding at zero, the connections of nodes with zero importance, i.e. dead ReLUs) has no "
    "switch: measured, same accuracy matrix as finetune but weights differ by ~2e-4",
    "er": ("strategy.memory_size=0",),
    "gem": ("strategy.memory_size=0",),
    "agem": ("strategy.memory_size=0",),
    "icarl": "needs memory_size > 0 (nearest-mean classifier) and trains with sigmoid BCE, not cross-entropy",
    "eeil": "needs memory_size > 0 and adds a balanced fine-tuning stage after each task",
    "bic": "needs memory_size > 0, holds part of each task out for the bias layer and corrects new-class logits",
    # alpha=0 rather than memory_size=0: the memory still fills with samples and logits, so this also shows
    # that filling it never perturbs training (memory_size=0 = finetune is in tests/test_der.py)
    "der": ("strategy.alpha=0",),
    "derpp": ("strategy.alpha=0", "strategy.beta=0"),
    "er_ace": "the asymmetric loss masks the seen classes absent from the incoming batch even without a memory; "
    "tests/test_er_ace.py checks that mask's exactly-zero gradients and that replay reaches the old classes",
    "gdumb": "never trains on the stream: at each task end the network is re-initialised and trained from scratch "
    "on the greedy class-balanced memory alone, so no setting makes it finetune; tests/test_gdumb.py checks that the "
    "stream's steps change nothing and that the final network is a function of the memory alone",
    # class-IL: WA's cross-entropy covers the classes seen so far (its head grows per task in the paper and
    # in PyCIL), i.e. finetune with train.active_classes=true; both runs get it (PROTECTION_OFF_SCENARIO)
    "lucir": "replaces the linear head by a cosine head (and removes the last ReLU), so no setting is finetune's "
    "linear model; with lambda_base=0 margin_weight=0 cbf=false memory_size=0 it equals finetune with the same cosine "
    "head and imprinting bit for bit: tests/test_lucir.py::test_with_its_losses_off_lucir_is_finetune_with_a_cosine_head",
    "xder": "the present-head cross-entropy (authors' code) covers only the current task's outputs, so no "
    "setting equals class-IL finetune, whose CE covers every output; with strategy.memory_size=0 lambd=0 eta=0 "
    "its training is task-IL finetune's in both scenarios, bit for bit "
    "(tests/test_xder.py::test_terms_off_is_finetune_task_il_bit_for_bit)",
    "podnet": "needs memory_size > 0, replaces the head by a 10-proxy cosine classifier (LSC) trained with NCA, not "
    "cross-entropy; tests/test_podnet.py::test_one_task_equals_plain_nca_training_of_the_lsc covers the reduction",
    "wa": ("strategy.memory_size=0", "strategy.kd_lambda=0", "strategy.align=false", "strategy.clip_weights=false"),
    # replay off; no generator training either (with replay off it cannot matter, and DGM's
    # discriminator is the classifier, which the GAN loop would otherwise keep training)
    "dgr": ("strategy.replay_ratio=0", "strategy.generator_passes=0"),
    "mergan": ("strategy.replay_ratio=0", "strategy.generator_passes=0"),
    "dgm_w": ("strategy.replay_ratio=0", "strategy.generator_passes=0"),
    "dgm_a": ("strategy.replay_ratio=0", "strategy.generator_passes=0"),
    "packnet": "isolation is structural (per-task masks over pruned weights); tested by unchanged logits instead",
    "cpg": "isolation is structural (pruning, pick masks, growth); tested by unchanged logits instead",
    "hat": "isolation is structural (per-task unit gates); tested by unchanged logits instead",
    "piggyback": "isolation is structural (per-task weight masks over a frozen backbone); tested by unchanged logits",
    "pnn": "isolation is structural (a frozen column per task); tested by unchanged logits instead",
    "den": "isolation is structural (selective retraining, expansion, splitting); tested by unchanged logits",
    "individual_networks": "a separate network per task; tested by unchanged logits instead",
    "feature_extraction": "the frozen body is the method; tested by unchanged logits instead",
}

# overrides both sides of the protection-off comparison need in a scenario
PROTECTION_OFF_SCENARIO = {
    ("lwf", "class_il"): ("train.active_classes=true",),
    ("wa", "class_il"): ("train.active_classes=true",),
}

# ----- cost knobs (not protection knobs): what each strategy runs with here ---------------
# Generators: 3 passes instead of 10 (on 20 training samples per task, 3 generator
# iterations of 2 critic updates each per task); widths, latent size, learning rates,
# replay ratio, masks and sparsity stay the shipped ones.
GENERATOR_BUDGET = ("strategy.generator_passes=3",)
COST: dict[str, tuple[str, ...]] = {
    "vcl": ("strategy.test_samples=10",),  # Monte-Carlo weight samples at prediction (cost only)
    "dgr": GENERATOR_BUDGET,
    "mergan": GENERATOR_BUDGET,
    "dgm_w": GENERATOR_BUDGET,
    "dgm_a": GENERATOR_BUDGET,
    # GDumb's training on the memory at each task end: 4 passes instead of the authors' 128 for MNIST
    "gdumb": ("strategy.epochs=4",),
}

# ----- protocol, backbones, optimizers, data ----------------------------------------------

PROTOCOL = (
    "train.epochs=1",
    "train.batch_size=16",
    "checkpoint=false",
    "progress=false",
    "device.num_threads=1",
    "seed=0",
)

BACKBONES = {
    "mlp": ("backbone=mlp", "backbone.hidden_sizes=[32,32]"),
    "cnn": ("backbone=cnn", "backbone.channels=[4,8]", "backbone.hidden_size=32"),
    # batch norm in every block
    "resnet_bn": ("backbone=reduced_resnet18", "backbone.nf=4"),
}

OPTIMIZERS = {
    "sgd": ("train.optimizer=sgd", "train.lr=0.05", "train.momentum=0.9", "train.weight_decay=5e-4"),
    "adamw": ("train.optimizer=adamw", "train.lr=0.01", "train.weight_decay=0.01"),
    "adam": ("train.optimizer=adam", "train.lr=0.01", "train.weight_decay=0"),
    # the optimizer (momentum buffers) carried across tasks: frozen must stay frozen when
    # the previous task's momentum still pushes its weights (isolation families only)
    "sgd_keep": ("train.optimizer=sgd", "train.lr=0.05", "train.momentum=0.9", "train.weight_decay=5e-4",
                 "train.reset_optimizer=false"),
}
# optimizers only the families with a frozen-parts invariant run with
FROZEN_ONLY_OPTIMIZERS = ("sgd_keep",)

DATASETS = {
    # real offline digits (8x8 grey), 10 training samples per class
    "digits": ("dataset=split_digits", "dataset.max_train_per_class=10"),
    # CIFAR-10 python pickle batches written by tests/real_format.py (32x32 RGB, 4 train / 2 test per class)
    "cifar10": ("dataset=split_cifar10",),
}

# ----- tiers ----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def strategy_scenarios(strategy: str) -> tuple[str, ...]:
    from hydra.utils import get_object

    target = OmegaConf.load(str(CONF.joinpath("strategy", f"{strategy}.yaml")))._target_
    return tuple(get_object(target).scenarios)


def collected_scenarios(strategy: str) -> tuple[str, ...]:
    """The scenarios to collect cases for; ("class_il",) when the strategy cannot be imported
    (its cases then fail with the import error instead of breaking collection)."""
    try:
        return strategy_scenarios(strategy)
    except Exception:
        return ("class_il",)


def strategies() -> list[str]:
    return conf_options("strategy")


def is_fast(strategy: str, backbone: str, optimizer: str, scenario: str, dataset: str) -> bool:
    """The fast tier: every strategy in its first scenario on digits, on each backbone with
    SGD (momentum + weight decay), plus AdamW (decoupled weight decay) on the batch-norm
    ResNet; the isolation methods also on the CIFAR files with the batch-norm ResNet.
    Everything else (other scenarios, Adam, AdamW elsewhere, carried optimizer state, the
    other CIFAR cases) is `exhaustive`."""
    if scenario != collected_scenarios(strategy)[0]:
        return False
    if dataset == "cifar10":
        return FAMILY.get(strategy) == ISOLATION and backbone == "resnet_bn" and optimizer == "sgd"
    return optimizer == "sgd" or (optimizer == "adamw" and backbone == "resnet_bn")


def conformance_cases() -> list[tuple[str, str, str, str, str]]:
    cases = []
    for strategy in strategies():
        for scenario in collected_scenarios(strategy):
            for backbone in BACKBONES:
                for optimizer in OPTIMIZERS:
                    if optimizer in FROZEN_ONLY_OPTIMIZERS and FAMILY.get(strategy) not in (ISOLATION, GENERATIVE_MASKED):
                        continue
                    for dataset in DATASETS:
                        if dataset == "cifar10" and (backbone == "mlp" or optimizer != "sgd"):
                            continue  # CIFAR: conv backbones with SGD is enough to exercise the format
                        cases.append((strategy, backbone, optimizer, scenario, dataset))
    return cases


def protection_off_cases() -> list[tuple[str, str, str, str]]:
    cases = []
    for strategy in strategies():
        if not isinstance(PROTECTION_OFF.get(strategy), tuple):
            continue
        for scenario in collected_scenarios(strategy):
            for backbone in BACKBONES:
                for optimizer in OPTIMIZERS:
                    if optimizer not in FROZEN_ONLY_OPTIMIZERS:
                        cases.append((strategy, backbone, optimizer, scenario))
    return cases


def protection_off_is_fast(strategy: str, backbone: str, optimizer: str, scenario: str) -> bool:
    return backbone == "mlp" and optimizer == "sgd" and scenario == collected_scenarios(strategy)[0]
