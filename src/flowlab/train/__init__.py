"""The one training loop, checkpoints and resume."""

from flowlab.train.checkpoint import load_model, load_run, save_model
from flowlab.train.loop import TrainConfig, TrainResult, learning_rate, train

__all__ = ["TrainConfig", "TrainResult", "learning_rate", "load_model", "load_run", "save_model",
           "train"]
