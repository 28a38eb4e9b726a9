"""``report.to = ["tensorboard"]``: every round's released metrics as TensorBoard scalars
under ``DIR/tensorboard/`` (``tensorboard --logdir DIR/tensorboard``), step = round (0 = the
initial evaluation), and the resolved config as a text entry. Needs the ``tensorboard`` package
(``pip install 'lora-a2[tensorboard]'``); written with torch's ``SummaryWriter``."""

from __future__ import annotations

from typing import Any

from .base import Reporter, RunStart, scalars


class TensorBoardReporter(Reporter):
    name = "tensorboard"
    package = "tensorboard"

    def __init__(self) -> None:
        self.writer: Any = None

    def start(self, run: RunStart) -> None:
        from torch.utils.tensorboard import SummaryWriter  # optional dependency: tensorboard

        self.writer = SummaryWriter(log_dir=str(run.out / "tensorboard"))
        if run.start_round == 1:
            self.writer.add_text("config", "```toml\n" + run.cfg.to_toml() + "\n```", 0)
            for key, value in scalars(run.initial).items():
                self.writer.add_scalar(key, value, 0)

    def round_end(self, record: dict[str, Any]) -> None:
        step = int(record["round"])
        for key, value in scalars(record).items():
            if key != "round":
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
