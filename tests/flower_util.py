"""What the Flower engine tests share: the tiny experiment, running it through the CLI, the
comparison of two runs' metrics, and reading a run's final state."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from lora_a2.checks import load_config
from lora_a2.engines.local import LocalTransport
from lora_a2.rounds import Reply, run_round
from lora_a2.runner import run_experiment

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


class FailingLocalTransport(LocalTransport):
    """The in-process transport with the Flower fault hook's failures
    (``LORA_A2_FLOWER_FAULT="ROUND:CLIENT"``): those clients get their task and never reply."""

    def __init__(self, failures: set[tuple[int, int]]) -> None:
        self.failures = failures

    def exchange(self, exp, rnd, tasks, on_client):
        keep = {c: b for c, b in tasks.items() if (rnd, c) not in self.failures}
        replies = super().exchange(exp, rnd, keep, on_client)
        return {**replies, **{c: Reply(failure="injected fault") for c in tasks if c not in keep}}


def run_local_failing(out: Path, data: Path, sets: list[str],
                      failures: set[tuple[int, int]]) -> Path:
    """The experiment ``sets`` on the local engine with ``failures`` injected: the plain run a
    Flower run with the same ``LORA_A2_FLOWER_FAULT`` must equal (the equivalence tests show
    the two engines agree), without starting a Ray simulation for it."""
    transport = FailingLocalTransport(failures)
    cfg = load_config(None, [*TINY, f"data.name=csv:{data}", *sets])
    run_experiment(cfg, out, progress=False,
                   round_fn=lambda exp, rnd, state, on_client=None:
                   run_round(exp, rnd, state, transport, on_client))
    return out


#: what only a Flower round's record has: Flower's own byte counts, timings and node warnings
FLOWER_EVAL = {"flower_eval_download_bytes", "flower_eval_upload_bytes"}  # personalised only
FLOWER_ONLY = {"flower_download_bytes", "flower_upload_bytes", "flower_query_bytes",
               "flower_timing", "node_warnings"} | FLOWER_EVAL


def assert_same_run(local: list[dict], flower: list[dict], tol: float = 1e-4) -> None:
    assert len(local) == len(flower)
    for a, b in zip(local, flower):
        assert {k: a[k] for k in SAME} == {k: b[k] for k in SAME}
        # the same fields, but for Flower's own; per client the same fields too
        assert set(b) - set(a) <= FLOWER_ONLY and set(a) <= set(b), set(a) ^ set(b)
        assert [sorted(c) for c in a["per_client"]] == [sorted(c) for c in b["per_client"]]
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


def simulate_together(base: Path, data: Path, runs: dict[str, list[str]],
                      shared: list[str]) -> dict[str, Path]:
    """The experiments ``runs`` (name → ``--set`` items, after :data:`TINY`, the data and
    ``shared``) in ONE Flower simulation (:func:`lora_a2.engines.flower.run_simulations`: Ray
    and its workers start once); each run's output folder by name."""
    from lora_a2.engines.flower import run_simulations

    outs = {name: base / name for name in runs}
    run_simulations([(load_config(None, [*TINY, f"data.name=csv:{data}", *shared, *sets,
                                         "engine.name=flower"]), outs[name])
                     for name, sets in runs.items()], progress=False)
    return outs


def final_state(out: Path) -> dict:
    """The run's global state (checkpoint.safetensors) as tensors."""
    from safetensors.torch import load_file

    return load_file(str(out / "checkpoint.safetensors"))


def max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
