"""``report.to = ["mlflow"]``: the run as an MLflow run — the resolved config as parameters,
every round's released metrics at step = round (0 = the initial evaluation), the summary's
numbers as ``summary/…`` metrics. The store is ``sqlite:///DIR/mlflow.db`` unless
``report.mlflow_tracking_uri`` names another (MLflow ≥ 3.13 refuses a bare file store), in the
experiment ``report.mlflow_experiment``. A resumed run continues its MLflow run (its id is kept
in ``DIR/mlflow_run.json``). Needs ``pip install 'lora-a2[mlflow]'``; browse with
``mlflow ui --backend-store-uri sqlite:///DIR/mlflow.db``."""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import Any

from ..config import flatten as flatten_config
from ..report import atomic_write_text
from .base import Reporter, RunStart, scalars


_NOT_IN_A_NAME = re.compile(r"[^\w\-. :/]")


def metric_name(key: str) -> str:
    """``key`` as an MLflow metric name: MLflow takes letters, digits, ``_ - . : /`` and spaces
    only, and a category ("(none)", "Q&A") becomes part of a key (``category_loss/(none)``);
    any other character becomes ``_``."""
    return _NOT_IN_A_NAME.sub("_", key)


def tracking_uri(run: RunStart) -> str:
    uri = run.cfg.report.mlflow_tracking_uri
    return uri or f"sqlite:///{(run.out / 'mlflow.db').resolve()}"


class MlflowReporter(Reporter):
    name = "mlflow"
    package = "mlflow"

    def __init__(self) -> None:
        self.client: Any = None
        self.run_id: str | None = None
        self.finished = False

    def start(self, run: RunStart) -> None:
        from mlflow.entities import Param  # optional dependency: mlflow
        from mlflow.tracking import MlflowClient

        for name in ("mlflow", "alembic"):  # a new store's schema migrations log at INFO
            logging.getLogger(name).setLevel(logging.WARNING)

        self.client = MlflowClient(tracking_uri=tracking_uri(run))
        name = run.cfg.report.mlflow_experiment
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            local = not run.cfg.report.mlflow_tracking_uri
            exp_id = self.client.create_experiment(
                name, artifact_location=(run.out / "mlflow-artifacts").resolve().as_uri()
                if local else None)
        else:
            exp_id = exp.experiment_id
        id_file = Path(run.out) / "mlflow_run.json"
        if run.start_round > 1 and id_file.exists():
            self.run_id = json.loads(id_file.read_text())["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            return
        created = self.client.create_run(exp_id, run_name=Path(run.out).name, tags={
            "lora_a2.strategy": run.cfg.strategy.name, "lora_a2.out_dir": str(run.out)})
        self.run_id = created.info.run_id
        atomic_write_text(id_file, json.dumps({"run_id": self.run_id,
                                               "tracking_uri": tracking_uri(run)}))
        params = [Param(k, str(v)[:6000]) for k, v in flatten_config(run.cfg.to_dict())
                  if v is not None]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        self._log(scalars(run.initial), 0)

    def _log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(metric_name(k), v, now, step) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def round_end(self, record: dict[str, Any]) -> None:
        self._log({k: v for k, v in scalars(record).items() if k != "round"},
                  int(record["round"]))

    def end(self, summary: dict[str, Any], records: list[dict[str, Any]]) -> None:
        self._log({f"summary/{k}": v for k, v in scalars(summary).items()},
                  int(summary.get("rounds") or 0))
        self.client.set_terminated(self.run_id, status="FINISHED")
        self.finished = True

    def close(self) -> None:
        if self.client is not None and self.run_id is not None and not self.finished:
            try:
                self.client.set_terminated(self.run_id, status="FAILED")
            except Exception:  # the store itself may be what failed; the run's error matters
                pass
