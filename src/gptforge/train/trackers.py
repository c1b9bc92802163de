"""Optional experiment trackers behind one interface: TensorBoard, MLflow (local file store), W&B (offline).

``make_trackers(["tensorboard", "mlflow"], run_dir, run_name, config)`` returns objects with ``log(metrics, step)``
and ``close()``. Each writes under the run directory unless the tracker's own environment variables say otherwise.
"""

from __future__ import annotations

import inspect
import math
import os
from pathlib import Path

from gptforge.errors import GptforgeError


class Tracker:
    def log(self, metrics: dict, step: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


def _numeric(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}


class TensorBoardTracker(Tracker):
    """Event files in ``<run>/tensorboard`` (view with ``tensorboard --logdir runs``)."""

    def __init__(self, run_dir: Path, run_name: str, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.writer.add_text("config", "```\n" + _yaml(config) + "\n```", 0)

    def log(self, metrics, step):
        for k, v in _numeric(metrics).items():
            self.writer.add_scalar(k, v, step)

    def close(self):
        self.writer.flush()
        self.writer.close()


class MLflowTracker(Tracker):
    """An MLflow run; the tracking URI defaults to a local file store in ``<run>/mlruns`` (works offline)."""

    def __init__(self, run_dir: Path, run_name: str, config: dict):
        import mlflow

        self.mlflow = mlflow
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            uri = (run_dir / "mlruns").resolve().as_uri()
            # MLflow 3 keeps the file store behind a flag; it is the only backend that needs nothing installed
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment("gptforge")
        # System metrics (CPU/GPU utilisation, memory), as seed 002 logged them, where MLflow can collect them:
        # its sampler needs psutil (and pynvml for GPUs); without them MLflow would only warn each run.
        kwargs = {}
        if "log_system_metrics" in inspect.signature(mlflow.start_run).parameters and _has("psutil"):
            kwargs["log_system_metrics"] = True
        self.system_metrics = bool(kwargs)
        self.run = mlflow.start_run(run_name=run_name, **kwargs)
        flat = _flatten(config)
        mlflow.log_params({k: str(v)[:250] for k, v in flat.items()})

    def log(self, metrics, step):
        self.mlflow.log_metrics(_numeric(metrics), step=step)

    def close(self):
        self.mlflow.end_run()


class WandbTracker(Tracker):
    """Weights & Biases in offline mode by default (``wandb sync`` uploads later)."""

    def __init__(self, run_dir: Path, run_name: str, config: dict):
        try:
            import wandb
        except ImportError:
            raise GptforgeError("log.trackers includes 'wandb' but wandb is not installed; `pip install wandb` "
                                "or remove it from log.trackers") from None
        os.environ.setdefault("WANDB_MODE", "offline")
        self.run = wandb.init(project="gptforge", name=run_name, dir=str(run_dir), config=config)

    def log(self, metrics, step):
        self.run.log(_numeric(metrics), step=step)

    def close(self):
        self.run.finish()


TRACKERS = {"tensorboard": TensorBoardTracker, "mlflow": MLflowTracker, "wandb": WandbTracker}


def make_trackers(names: list[str], run_dir: Path, run_name: str, config: dict) -> list[Tracker]:
    out = []
    for name in names:
        if name not in TRACKERS:
            raise GptforgeError(f"unknown tracker {name!r} in log.trackers; choose from {', '.join(TRACKERS)}")
        out.append(TRACKERS[name](Path(run_dir), run_name, config))
    return out


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _yaml(config: dict) -> str:
    import yaml

    return yaml.safe_dump(config, sort_keys=False)
