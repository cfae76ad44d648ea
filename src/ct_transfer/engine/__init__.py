"""The training engine: ``fit`` (the loop), callbacks, strategies, the engine's data tensors."""

from .callbacks import (Callback, Checkpoint, EarlyStopping, HistoryCSV, ProgressLog, StopWhen, TimeToAccuracy,
                        TrackBest)
from .loop import TrainState, pick_device, pooled_features
from .strategies import apply_strategy, default_freeze_until, parameter_groups, set_train_mode
from .workers import fit  # one process, or one run across worker processes

__all__ = ["Callback", "Checkpoint", "EarlyStopping", "HistoryCSV", "ProgressLog", "StopWhen", "TimeToAccuracy",
           "TrackBest", "TrainState", "fit", "pick_device", "pooled_features", "apply_strategy",
           "default_freeze_until", "parameter_groups", "set_train_mode"]
