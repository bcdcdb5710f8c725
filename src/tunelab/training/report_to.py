"""Optional export of the per-step metrics to TensorBoard, MLflow or Weights & Biases.

    train:
      report_to: [tensorboard]        # or: tunelab train cfg.yaml --set 'train.report_to=[mlflow]'

metrics.jsonl in the run directory is always written and is the source of truth;
these are extra views. None of the packages is a dependency of tunelab: a name
listed here whose package is missing is an error before training starts, with the
pip command that fixes it. Each sink gets numbers only (loss, lr, grad norm,
tokens/s, memory, validation loss and token accuracy), keyed by optimizer step.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Any, Protocol

from tunelab.errors import TunelabError

PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


class Sink(Protocol):
    def log(self, step: int, values: dict[str, float]) -> None: ...
    def close(self) -> None: ...


class _TensorBoard:
    def __init__(self, run_path: Path, config: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self.writer = SummaryWriter(log_dir=str(run_path / "tensorboard"))

    def log(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(f"train/{key}", value, step)

    def close(self) -> None:
        self.writer.close()


class _MLflow:
    def __init__(self, run_path: Path, config: dict[str, Any]) -> None:
        self.mlflow = importlib.import_module("mlflow")
        self.mlflow.start_run(run_name=run_path.name)
        self.mlflow.log_params(_flatten(config))

    def log(self, step: int, values: dict[str, float]) -> None:
        self.mlflow.log_metrics(values, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


class _WandB:
    def __init__(self, run_path: Path, config: dict[str, Any]) -> None:
        self.wandb = importlib.import_module("wandb")
        self.run = self.wandb.init(name=run_path.name, dir=str(run_path), config=config)

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


_SINKS = {"tensorboard": _TensorBoard, "mlflow": _MLflow, "wandb": _WandB}


class MetricsExport:
    """Forwards each metrics record to the sinks asked for; does nothing when none is."""

    def __init__(self, sinks: list[Sink]) -> None:
        self.sinks = sinks

    @classmethod
    def open(cls, names: list[str], run_path: Path, config: dict[str, Any]) -> "MetricsExport":
        for name in names:
            if importlib.util.find_spec(PACKAGES[name]) is None:
                raise TunelabError(
                    f"train.report_to lists '{name}' but the {PACKAGES[name]} package is not installed",
                    fix=f"pip install {PACKAGES[name]}  (or remove '{name}' from train.report_to)",
                )
        return cls([_SINKS[name](run_path, config) for name in names])

    def log(self, record: dict[str, Any]) -> None:
        values = {k: float(v) for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        for sink in self.sinks:
            sink.log(int(record["step"]), values)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{'train': {'epochs': 3}} -> {'train.epochs': '3'}: MLflow params are flat strings."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = str(value)
    return flat
