"""Fine-tuning: plain sequential training, each task in turn with no protection.

The lower bound of every continual-learning table (called "Naive" in Avalanche, "SGD"
in Mammoth, "Fine-tuning" in FACIL and in De Lange et al., TPAMI 2021, Sec. 6).
Everything it does is the `Strategy` default behaviour.
"""

from cl_bench.strategies.base import Strategy


class Finetune(Strategy):
    supports_loss_scaling = True  # every training-step gradient goes through backward/optimizer_step
