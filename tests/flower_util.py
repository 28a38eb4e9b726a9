"""What the Flower engine tests share: the tiny experiment, running it through the CLI, the
comparison of two runs' metrics, and reading a run's final state."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from conftest import TINY as TINY_RUN
from conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# the shared tiny run; every Flower test sets its own client and round counts
TINY = [s for s in TINY_RUN if not s.startswith(("data.num_clients=", "train.rounds="))]
SAME = ("round", "active_factor", "clients", "num_replies", "status", "dropped", "upload_bytes",
        "download_bytes", "upload_params", "download_params", "upload_slot_ids", "rejected")


def run(out: Path, data: Path, sets: list[str]) -> Path:
    return run_cli(out, *sets, data=data, base=TINY)


def assert_same_run(local: list[dict], flower: list[dict], tol: float = 1e-4) -> None:
    assert len(local) == len(flower)
    for a, b in zip(local, flower):
        assert {k: a[k] for k in SAME} == {k: b[k] for k in SAME}
        for k in ("accuracy", "macro_f1", "loss", "train_loss", "epsilon"):
            if a.get(k) is None:  # e.g. no train_loss under local DP, no epsilon without DP
                assert b.get(k) is None, (a["round"], k)
            else:
                assert b[k] == pytest.approx(a[k], abs=tol), (a["round"], k)
        assert [c["upload_bytes"] for c in a["per_client"]] == \
            [c["upload_bytes"] for c in b["per_client"]]
        # what Flower itself moved: our payload plus its records/metadata (and the config TOML)
        assert b["flower_download_bytes"] > b["download_bytes"]
        assert b["flower_upload_bytes"] > b["upload_bytes"]


def final_state(out: Path) -> dict:
    """The run's global state (checkpoint.safetensors) as tensors."""
    from safetensors.torch import load_file

    return load_file(str(out / "checkpoint.safetensors"))


def max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
