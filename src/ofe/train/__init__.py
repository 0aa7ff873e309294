"""Training: the config of ``ofe train`` (`config`; the type is :class:`ofe.run_config.TrainConfig`), the parts of a run built from it (`build`), the loop (`loop`),
JSONL + TensorBoard logs (`logger`), DDP via torchrun (`distributed`)."""

from ofe.train.build import TrainError
from ofe.run_config import TrainConfig, build_train_config
from ofe.train.loop import NonFiniteLoss, train

__all__ = ["NonFiniteLoss", "TrainConfig", "TrainError", "build_train_config", "train"]
