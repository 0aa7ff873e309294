"""Training: typed config, resumable checkpoints, JSONL + TensorBoard logs, DDP via torchrun."""

from ofe.train.checkpoint import CheckpointError
from ofe.train.config import TrainConfig, build_train_config
from ofe.train.logger import read_metrics
from ofe.train.loop import NonFiniteLoss, TrainError, train

__all__ = ["CheckpointError", "NonFiniteLoss", "TrainConfig", "TrainError", "build_train_config", "read_metrics", "train"]
