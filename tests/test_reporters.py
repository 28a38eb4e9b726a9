"""Reporters of the round events: metrics.jsonl, plots, progress, console summary, and the
optional TensorBoard and MLflow ones (``report.to``), all fed the released record only."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

import lora_a2
from lora_a2.config import load_config
from lora_a2.errors import UserError
from lora_a2.report import read_metrics
from lora_a2.reporters import (OPTIONAL, MetricsFile, Reporter, Reporters, RunStart,
                               build_reporters, check_config, scalars)

from conftest import TINY as TINY_RUN
from conftest import assert_config_error

TINY = [*TINY_RUN, "data.num_clients=3", "train.rounds=2"]
# central DP: the release withholds per-client values, which no reporter may then see
CENTRAL = ["privacy.mechanism=gaussian", "privacy.mode=central", "privacy.noise_multiplier=1",
           "privacy.clip=0.1", "privacy.noise_source=seeded"]


@pytest.fixture(scope="module")
def reported_run(tmp_path_factory):
    """One tiny central-DP run reporting to TensorBoard and MLflow (shared by the tests)."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    from conftest import synthetic_texts

    tmp = tmp_path_factory.mktemp("reported")
    texts, labels = synthetic_texts(240)
    names = ["fruit", "animal", "colour"]
    csv = tmp / "toy.csv"
    csv.write_text("text,label\n" + "".join(f"{t},{names[y]}\n" for t, y in zip(texts, labels)))
    out = tmp / "run"
    summary = lora_a2.run(None, out=out, overrides=[f"data.name=csv:{csv}", *TINY, *CENTRAL,
                                                    'report.to=["tensorboard", "mlflow"]'])
    return out, summary


def _tensorboard(out: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _mlflow(out: Path):
    from mlflow.tracking import MlflowClient

    ids = json.loads((out / "mlflow_run.json").read_text())
    return MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}"), ids["run_id"]


def test_tensorboard_gets_every_round_of_the_released_metrics(reported_run):
    out, _ = reported_run
    records = read_metrics(out / "metrics.jsonl")
    initial = json.loads((out / "initial_eval.json").read_text())
    tb = _tensorboard(out)
    assert [s for s, _ in tb["accuracy"]] == [0, 1, 2]
    for (step, value), r in zip(tb["accuracy"][1:], records):
        assert value == pytest.approx(r["accuracy"], abs=1e-6)  # float32 in the event file
    assert tb["accuracy"][0][1] == pytest.approx(initial["accuracy"], abs=1e-6)
    released = {k for r in records for k in scalars(r)} | set(scalars(initial))
    assert set(tb) <= released, set(tb) - released
    # what the central release withholds reached the server's log, not TensorBoard
    withheld = {k for r in read_metrics(out / "server_log.jsonl") for k in scalars(r)} - released
    assert any(k.startswith("rank_allocation/") for k in withheld)
    assert not withheld & set(tb)


def test_mlflow_run_holds_the_config_and_the_round_metrics(reported_run):
    out, summary = reported_run
    client, run_id = _mlflow(out)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["strategy.name"] == "lora-a2"
    assert run.data.params["privacy.mode"] == "central"
    records = read_metrics(out / "metrics.jsonl")
    history = client.get_metric_history(run_id, "accuracy")
    assert [m.step for m in history] == [0, 1, 2]
    assert [m.value for m in history[1:]] == [r["accuracy"] for r in records]
    assert run.data.metrics["summary/final_accuracy"] == summary["final_accuracy"]
    assert not any(k.startswith("rank_allocation") for k in run.data.metrics)  # withheld


def test_a_resumed_run_continues_its_mlflow_run(reported_run):
    out, _ = reported_run
    client, run_id = _mlflow(out)
    lora_a2.resume(out)  # nothing left to run: the run is reopened and finished again
    again, same = _mlflow(out)
    assert same == run_id and again.get_run(run_id).info.status == "FINISHED"
    assert len(again.search_runs([again.get_run(run_id).info.experiment_id])) == 1


def test_every_metric_key_is_a_name_mlflow_takes():
    """Instruction categories become parts of metric keys (``category_loss/(none)``, the
    loader's name for a missing category): MLflow refused the whole run's start with them."""
    pytest.importorskip("mlflow")
    from mlflow.utils.validation import _validate_metric_name

    from lora_a2.reporters.mlflow import MlflowReporter

    logged: list[str] = []
    rep = MlflowReporter()
    rep.client = SimpleNamespace(log_batch=lambda run_id, metrics: logged.extend(
        m.key for m in metrics))
    rep.run_id = "run"
    rep.round_end({"round": 1, "accuracy": 0.5, "category_loss": {
        "(none)": 1.0, "Q&A": 2.0, "a,b": 3.0, "open qa": 4.0, "brain-storm.v2": 5.0}})
    assert sorted(logged) == sorted(["accuracy", "category_loss/_none_", "category_loss/Q_A",
                                     "category_loss/a_b", "category_loss/open qa",
                                     "category_loss/brain-storm.v2"])
    for name in logged:
        _validate_metric_name(name)


@pytest.mark.parametrize("value,needle", [
    ('["wandb"]', "entries must be among tensorboard, mlflow, got 'wandb'"),
    ('["mlflow", "mlflow"]', "names a reporter twice"),
    ('"mlflow"', "report.to' must be a list"),
])
def test_a_bad_reporter_is_a_one_line_error(capsys, value, needle):
    assert_config_error(capsys, [f"report.to={value}"], needle)


def test_an_empty_mlflow_experiment_is_a_one_line_error(capsys):
    assert_config_error(capsys, ["report.mlflow_experiment=''"],
                        "report.mlflow_experiment' must not be empty")


def test_a_reporter_whose_package_is_missing_is_named(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlflow" else real(name, *a))
    cfg = load_config(None, ['report.to=["mlflow"]'])
    with pytest.raises(UserError, match=r"package 'mlflow' is not installed: pip install "
                                        r"'lora-a2\[mlflow\]'"):
        check_config(cfg)


def test_events_reach_reporters_in_order_metrics_file_first(tmp_path, monkeypatch):
    """Every reporter hears each event after metrics.jsonl has the round on disk: the spy is
    an optional reporter, placed where build_reporters places them."""
    seen: list[tuple[str, object]] = []

    class Spy(Reporter):
        def round_end(self, record):
            lines = read_metrics(run_dir / "metrics.jsonl")
            seen.append(("round", lines[-1]["round"] == record["round"]))

        def end(self, summary, records):
            seen.append(("end", len(records)))

        def close(self):
            seen.append(("close", None))

    run_dir = tmp_path
    monkeypatch.setitem(OPTIONAL, "tensorboard", Spy)
    cfg = load_config(None, ['report.to=["tensorboard"]'])
    reps = build_reporters(cfg, progress=True, console=True)
    assert type(reps.reporters[0]) is MetricsFile
    assert sum(type(r) is Spy for r in reps.reporters) == 1
    reps.start(RunStart(cfg, run_dir, 1, 1, "accuracy", {"accuracy": 0.5}))
    reps.round_end({"round": 1, "accuracy": 0.6})
    reps.round_end({"round": 2, "accuracy": 0.7})
    reps.close()
    assert seen == [("round", True), ("round", True), ("close", None)]
    assert isinstance(reps, Reporters)


def test_an_optional_reporter_that_fails_is_refused_at_start_and_switched_off_later(
        tmp_path, capsys):
    """report.to's reporters talk to outside stores: one that cannot start stops the run
    before round 1 (one line); one that fails mid-run is switched off with a warning while
    metrics.jsonl and the others go on; a core reporter's failure is a bug and propagates."""
    class Flaky(Reporter):
        name = "flaky"

        def __init__(self, fail_at):
            self.fail_at, self.rounds, self.closed = fail_at, [], False

        def start(self, run):
            if self.fail_at == 0:
                raise ConnectionError("store unreachable\nsecond line")

        def round_end(self, record):
            if record["round"] == self.fail_at:
                raise OSError("connection reset")
            self.rounds.append(record["round"])

        def close(self):
            self.closed = True

    class Core(Reporter):  # no name: one of the built-in reporters
        def round_end(self, record):
            raise RuntimeError("a bug in a core reporter")

    cfg = load_config(None, [])
    run = RunStart(cfg, tmp_path, 1, 1, "accuracy", {"accuracy": 0.5})
    with pytest.raises(UserError, match=r"^config key 'report.to': 'flaky' could not start: "
                                        r"ConnectionError: store unreachable$"):
        Reporters([Flaky(0)]).start(run)
    flaky, later = Flaky(2), Flaky(99)
    reps = build_reporters(cfg, progress=False)
    reps.reporters += [flaky, later]
    reps.start(run)
    capsys.readouterr()
    for rnd in (1, 2, 3):
        reps.round_end({"round": rnd, "accuracy": 0.6})
    assert flaky.rounds == [1] and flaky.closed and flaky not in reps.reporters
    assert later.rounds == [1, 2, 3]  # the reporters after it heard every round
    assert [r["round"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    err = capsys.readouterr().err.strip()
    assert err == ("lora-a2: warning: report.to 'flaky' failed (OSError: connection reset); it "
                   "is off for the rest of this run, metrics.jsonl has every round")
    reps.close()
    with pytest.raises(RuntimeError, match="core reporter"):
        Reporters([Core()]).round_end({"round": 1})


def test_scalars_flatten_tables_and_skip_the_rest():
    record = {"round": 3, "accuracy": 0.5, "ok": True, "name": "x", "none": None,
              "rank_allocation": {"query": 4, "value": 2}, "per_client": [{"loss": 1.0}]}
    assert scalars(record) == {"round": 3.0, "accuracy": 0.5, "rank_allocation/query": 4.0,
                               "rank_allocation/value": 2.0}


def test_the_upload_line_labels_each_reference_by_what_it_depends_on():
    """"at the same rank" for a rank-based reference wherever it is listed, and the size of a
    rank-free one (fedavg-full) even when it comes second."""
    from lora_a2.reporters.console import _references

    full = {"upload_fraction_of_fedavg_full": 0.00282, "fedavg_full_upload_params": 1,
            "fedavg_full_upload_bytes": 7.27e9, "fedavg_full_scales_with_rank": False}
    lora = {"upload_fraction_of_fl_lora": 0.771, "fl_lora_upload_params": 1,
            "fl_lora_upload_bytes": 26.6e6, "fl_lora_scales_with_rank": True}
    assert _references({**full, **lora}) == (
        " = 0.282% of fedavg-full's 7.27 GB, 77.1% of fl-lora's at the same rank")
    assert _references({**lora, **full}) == (
        " = 77.1% of fl-lora's 26.60 MB at the same rank, 0.282% of fedavg-full's 7.27 GB")


@pytest.mark.parametrize("sets,per_round", [
    ([], 4),  # every client each round
    (["train.clients_per_round=2", "train.over_select=0.5", "fleet.profile=uniform"], 3),
    (["train.mode=async", "fleet.profile=uniform", "train.concurrency=3",
      "train.buffer_size=2"], 0),  # no fixed count: progress in rounds
])
def test_the_progress_total_is_what_each_round_reports(tmp_path, monkeypatch, synthetic_csv,
                                                       sets, per_round):
    """RunStart.clients_per_round is the count of clients each round reports done (sampled,
    over-selected ones included); asynchronous rounds have none (0)."""
    seen: dict[str, list] = {"start": [], "done": [], "rounds": []}

    class Spy(Reporter):
        name = "tensorboard"

        def start(self, run):
            seen["start"].append(run.clients_per_round)

        def client_done(self, client):
            seen["done"].append(client)

        def round_end(self, record):
            seen["rounds"].append(len(seen["done"]))

    monkeypatch.setitem(OPTIONAL, "tensorboard", Spy)
    lora_a2.run(None, out=tmp_path / "o", overrides=[
        f"data.name=csv:{synthetic_csv}", *TINY_RUN, "train.rounds=2", 'report.to=["tensorboard"]',
        *sets])
    assert seen["start"] == [per_round]
    if per_round:
        assert seen["rounds"] == [per_round, 2 * per_round]


def test_the_progress_bar_stands_at_each_round_s_end(tmp_path):
    from lora_a2.reporters.progress import ProgressBar

    cfg = load_config(None, ["train.rounds=3"])
    for per_round, calls, want in ((4, 5, [4, 8]), (0, 3, [1, 2])):
        bar = ProgressBar()
        bar.start(RunStart(cfg, tmp_path, 1, per_round, "accuracy", {"accuracy": 0.5}))
        got = []
        for rnd in (1, 2):
            for c in range(calls):  # more (or fewer) client events than the round's count
                bar.client_done(c)
            bar.round_end({"round": rnd, "accuracy": 0.5})
            got.append(bar.bar.n)
        bar.close()
        assert got == want
