"""Training curves in the user's experiment tracker (``distill.report_to``; GRPO passes ``grpo.report_to`` to TRL).

No tracker of our own: accelerate's tracking layer (``accelerate.tracking``: TensorBoard, W&B, trackio, MLflow, ...)
does the work; :func:`open_tracker` starts one on rank 0 and :meth:`Tracker.log` sends it the numeric fields of each
``train_log.jsonl`` row under ``<stage>/<field>``, at the row's step. ``train_log.jsonl`` stays the record; the
tracker is a view of it, so it is left out of the stage's fingerprint. Offline-safe: TensorBoard and trackio write
local files, and W&B runs in offline mode unless ``WANDB_MODE`` or ``WANDB_API_KEY`` says otherwise.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from ssb import dist
from ssb.errors import SsbError

# the package each tracker needs (what `pip install` names), when it is not the tracker's own name
_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "comet_ml": ("comet_ml",), "dvclive": ("dvclive",)}
LOG_DIR = "tracker"  # inside the stage directory, for trackers that write files


def tracker_dir(stage_dir: Path) -> Path:
    return Path(stage_dir) / LOG_DIR


def check_available(name: str, key: str) -> None:
    """Raise a one-line error when tracker ``name`` (chosen by config key ``key``) is not installed."""
    if name == "none":
        return
    packages = _PACKAGES.get(name, (name,))
    if not any(importlib.util.find_spec(p) is not None for p in packages):
        raise SsbError(f"{key}={name} needs the {packages[0]} package: pip install {packages[0]}")


def offline_by_default(name: str) -> None:
    """W&B without credentials or an explicit mode would ask for a login (or hang without network): run offline."""
    if name == "wandb" and "WANDB_MODE" not in os.environ and "WANDB_API_KEY" not in os.environ:
        os.environ["WANDB_MODE"] = "offline"


class Tracker:
    """One accelerate tracker for one stage's training curve."""

    def __init__(self, name: str, stage: str, stage_dir: Path, run_name: str, config: dict):
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        cls = LOGGER_TYPE_TO_CLASS[name]
        offline_by_default(name)
        if cls.requires_logging_directory:
            self._tracker = cls(run_name, str(tracker_dir(stage_dir)))
        else:
            self._tracker = cls(run_name)
        if hasattr(self._tracker, "start"):  # accelerate >= 1.6 starts trackers explicitly
            self._tracker.start()
        self.stage = stage
        self._tracker.store_init_configuration(_scalars(config))

    def log(self, row: dict) -> None:
        """The numeric fields of a log row (``skipped`` as 0/1), at ``row["step"]``."""
        values = {f"{self.stage}/{k}": float(v) for k, v in row.items()
                  if k != "step" and isinstance(v, (int, float))}
        values.setdefault(f"{self.stage}/skipped", 0.0)
        self._tracker.log(values, step=int(row["step"]))

    def close(self) -> None:
        self._tracker.finish()


def open_tracker(name: str, stage: str, stage_dir: Path, run_name: str, config: dict) -> Tracker | None:
    """A started tracker on rank 0, or None (``none``, or another rank)."""
    if name == "none" or not dist.is_main():
        return None
    check_available(name, f"{stage}.report_to")
    return Tracker(name, stage, stage_dir, run_name, config)


def _scalars(config: dict, prefix: str = "") -> dict:
    """A nested config flattened to the scalar values trackers accept as hyperparameters (lists as strings)."""
    out = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_scalars(v, key + "."))
        elif v is None or isinstance(v, (bool, int, float, str)):
            out[key] = v if v is not None else "null"
        else:
            out[key] = str(v)
    return out
