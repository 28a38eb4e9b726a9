"""Untrusted uploads, dropouts, crash-safe resume, and bad input (issue: reliability)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as load_bytes
from safetensors.torch import save as st_save
from safetensors.torch import save_file

import lora_a2
from lora_a2.checkpoint import load_checkpoint
from lora_a2.cli import main
from lora_a2.config import load_config
from lora_a2.engines.local import LocalTransport, drops_out, read_eval_reply, run_round
from lora_a2.client import EncodedData
from lora_a2.experiment import data_digest, prepare
from lora_a2.payload import InvalidPayload, Payload, decode, encode
from lora_a2.errors import UserError
from lora_a2.locks import RUN_LOCK
from lora_a2.report import read_metrics
from lora_a2.rounds import Reply, evaluate_clients
from lora_a2.rounds import run_round as run_round_over
import lora_a2.runner as runner_module
from lora_a2.runner import check_out_dir, replace_out_dir, run_experiment
from lora_a2.strategies import ClientContext, Update
from lora_a2.tasks.classification import Classification
from lora_a2.validation import UploadLimits, receive_upload

from conftest import TINY as TINY_RUN
from conftest import run_cli

# the shared tiny run, without its round count (each test sets its own)
TINY = [s for s in TINY_RUN if not s.startswith("train.rounds=")]


def tiny_exp(csv, *sets):
    return prepare(load_config(None, TINY + [f"data.name=csv:{csv}", *sets]))


# ---------------------------------------------------------------------- fuzzing the validator
@pytest.fixture(scope="module")
def honest(tmp_path_factory):
    """A real task and honest upload for lora-a2 and fl-lora, to mutate."""
    from conftest import synthetic_texts

    path = tmp_path_factory.mktemp("fuzz") / "toy.csv"
    texts, labels = synthetic_texts(120)
    path.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in zip(texts, labels)))
    out = {}
    for name in ("lora-a2", "fl-lora"):
        exp = tiny_exp(path, f"strategy.name={name}")
        s = exp.strategy
        state = s.init_state(exp.runtime.initial_state())
        task = s.configure(1, 0, state)
        ctx = ClientContext(exp.runtime, exp.enc_train, exp.client_train[0], exp.cfg)
        upd = s.client_update(ctx, task)
        receive_upload(s, task, encode(upd.to_payload()), UploadLimits())  # honest passes
        out[name] = (s, task, upd)
    return out


def _mutants(upd: Update, kind: str, n: int, x: float):
    meta = {"client": upd.client_id, "num_examples": upd.num_examples, **upd.meta}
    v, sl = upd.values.clone(), None if upd.slots is None else upd.slots.clone()
    blob = encode(upd.to_payload())
    if kind == "truncate":
        return blob[: n % len(blob)]
    if kind == "nan":
        v[n % v.numel()] = float("nan") if x > 0 else float("inf")
    elif kind == "drop-values":
        v = v[: max(0, v.numel() - 1 - n % 50)]
    elif kind == "extra-values":
        v = torch.cat([v, torch.zeros(1 + n % 50)])
    elif kind == "dtype":
        return st_save({"values": v.double()}, metadata={"meta": json.dumps(meta)})
    elif kind == "slot-range":
        if sl is None:
            sl = torch.tensor([0], dtype=torch.int32)
        sl[n % sl.numel()] = 10_000 + n if x > 0 else -1 - n
    elif kind == "slot-dup":
        if sl is None or sl.numel() < 2:
            sl = torch.tensor([0, 0], dtype=torch.int32)
        else:
            sl[1] = sl[0]
    elif kind == "too-many-slots":
        sl = torch.arange(10_000, dtype=torch.int32)
    elif kind == "wrong-client":
        meta["client"] = upd.client_id + 1 + n
    elif kind == "bad-examples":
        meta["num_examples"] = -n
    elif kind == "huge-examples":  # inf, a 400-digit integer, or just past the exact range
        meta["num_examples"] = [float("inf"), 10**400 + n, 2**53 + 1 + n][n % 3]
    elif kind == "bad-loss":
        meta["loss"] = ["x", {}, float("nan"), 10**400, True, [1.0]][n % 6]
    elif kind == "deep-json":  # metadata nested past the JSON parser's recursion limit
        deep = "[" * (100_000 + n % 1000) if x > 0 else '{"a":' * (100_000 + n % 1000)
        return st_save({"values": v}, metadata={"meta": deep})
    elif kind == "long-number":  # past int()'s 4,300-digit limit for str → int
        return st_save({"values": v}, metadata={"meta": '{"client":' + "9" * (5000 + n % 99) + "}"})
    elif kind == "huge":
        return encode(Payload(torch.zeros(300_000), None, meta))
    elif kind == "garbage":
        return os.urandom(1 + n % 200)
    elif kind == "header-json":
        return (8).to_bytes(8, "little") + b"{notjson"
    elif kind == "unsupported-dtype":  # safetensors knows these; torch has no such dtype
        dtype, size = [("F4", 2), ("F6_E2M3", 3), ("F6_E3M2", 3), ("F8_E8M0", 4)][n % 4]
        header = json.dumps({"values" if x > 0 else "extra": {
            "dtype": dtype, "shape": [4], "data_offsets": [0, size]},
            "__metadata__": {"meta": json.dumps(meta)}}).encode()
        header += b" " * (-len(header) % 8)
        return len(header).to_bytes(8, "little") + header + bytes(size)
    return encode(Payload(v, sl, meta))


KINDS = ["truncate", "nan", "drop-values", "extra-values", "dtype", "slot-range", "slot-dup",
         "too-many-slots", "wrong-client", "bad-examples", "huge-examples", "bad-loss",
         "deep-json", "long-number", "huge", "garbage", "header-json", "unsupported-dtype"]
FUZZ_CASES = 400


@settings(max_examples=FUZZ_CASES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(["lora-a2", "fl-lora"]), st.sampled_from(KINDS), st.integers(0, 10**6),
       st.floats(-1, 1))
def test_fuzzed_uploads_are_all_rejected_with_a_reason(honest, strategy, kind, n, x):
    s, task, upd = honest[strategy]
    if kind in ("slot-range", "slot-dup", "too-many-slots") and strategy == "fl-lora":
        kind = kind  # dense uploads must carry no slots at all: still invalid
    blob = _mutants(upd, kind, n, x)
    with pytest.raises(InvalidPayload) as e:
        receive_upload(s, task, blob, UploadLimits(max_bytes=1_000_000))
    assert str(e.value)


def test_norm_bound_rejects(honest):
    s, task, upd = honest["lora-a2"]
    norm = float(upd.values.norm())
    blob = encode(upd.to_payload())
    receive_upload(s, task, blob, UploadLimits(max_norm=norm * 1.01))
    with pytest.raises(InvalidPayload, match="norm"):
        receive_upload(s, task, blob, UploadLimits(max_norm=norm * 0.5))


@pytest.mark.parametrize("meta", [
    {"client": 1, "metrics": {"accuracy": 0.5}},  # another client's answer
    {"client": 0, "metrics": [0.5]},
    {"client": 0},
    {"client": 0, "metrics": {"accuracy": -0.1}},
    {"client": 0, "metrics": {"accuracy": float("nan")}},
    {"client": 0, "metrics": {"accuracy": 10**400}},  # isfinite() overflows on it
    {"client": 0, "metrics": {"accuracy": "0.9"}},
])
def test_a_bad_evaluation_answer_is_dropped_not_raised(meta):
    """A personalised strategy's evaluate phase: a client's answer is untrusted too."""
    assert read_eval_reply(encode(Payload(torch.zeros(0), None, {"client": 0, "metrics": {
        "accuracy": 0.5, "loss": None}})), 0) == {"accuracy": 0.5, "loss": None}
    assert read_eval_reply(encode(Payload(torch.zeros(0), None, meta)), 0) is None


GOOD_ANSWER = {"accuracy": 0.5, "macro_f1": 0.4, "loss": 1.2, "local_accuracy": 0.6,
               "local_held_out": 1}


@pytest.mark.parametrize("metrics,needle", [
    ({}, "missing"),  # every key the server reads is there
    ({**GOOD_ANSWER, "accuracy": None}, "'accuracy' = 'None'"),
    ({**GOOD_ANSWER, "accuracy": 1e300}, "'accuracy' = '1e+300' is outside [0, 1]"),
    ({**GOOD_ANSWER, "macro_f1": 1.5}, "'macro_f1'"),
    ({**GOOD_ANSWER, "local_held_out": 2}, "'local_held_out'"),
    ({**GOOD_ANSWER, "bonus": 1.0}, "'bonus'] not expected"),
])
def test_an_evaluation_answer_without_the_tasks_metrics_is_rejected_and_named(metrics, needle):
    """A personalised run's evaluate phase reads each answer's accuracy, macro-F1, loss and
    local accuracy: one missing, None or out of range crashed the server's merge (and every
    resume after it); now the round goes on without that client, naming it."""
    good = {"client": 0, "metrics": GOOD_ANSWER}
    answers = {0: Reply(encode(Payload(torch.zeros(0), None, good))),
               1: Reply(encode(Payload(torch.zeros(0), None, {"client": 1, "metrics": metrics})))}
    task = Classification(load_config(None, []))
    exp = SimpleNamespace(cfg=SimpleNamespace(data=SimpleNamespace(num_clients=2)), task=task,
                          strategy=SimpleNamespace(eval_task=lambda rnd, c, state: SimpleNamespace(
                              to_payload=lambda layout: Payload(torch.zeros(0), None, {}))),
                          runtime=SimpleNamespace(layout=None))
    transport = SimpleNamespace(exchange_eval=lambda exp, rnd, tasks: answers)
    out = evaluate_clients(exp, 1, None, transport)
    assert out["client_eval"][0] == GOOD_ANSWER and out["client_eval"][1] is None
    assert len(out["eval_failures"]) == 1 and out["eval_failures"][0].startswith(
        "client 1: evaluation answer rejected: ") and needle in out["eval_failures"][0]
    merged = task.merge_client_evals({"accuracy": 0.1}, out["client_eval"])  # no crash
    assert merged["accuracy"] == 0.5 and merged["local_accuracy"] == [0.6, None]


# ---------------------------------------------------------------------- bytes on the wire
@pytest.mark.parametrize("name", ["lora-a2", "fl-lora"])
def test_recorded_bytes_are_the_lengths_of_what_crossed(synthetic_csv, name):
    """Each client's download_bytes and upload_bytes are the lengths of the very task and
    upload bytes the transport carried (recorded here as they crossed), and the round's totals
    their sums."""
    seen: dict[int, tuple[int, int]] = {}

    class Recording(LocalTransport):
        def exchange(self, exp, rnd, tasks, on_client):
            replies = super().exchange(exp, rnd, tasks, on_client)
            seen.update({c: (len(tasks[c]), len(replies[c].blob)) for c in tasks})
            return replies

    exp = tiny_exp(synthetic_csv, f"strategy.name={name}")
    state = exp.strategy.init_state(exp.runtime.initial_state())
    _, record = run_round_over(exp, 1, state, Recording(), None)
    assert sorted(seen) == sorted(record["clients"]) and len(seen) == 4
    for row in record["per_client"]:
        assert (row["download_bytes"], row["upload_bytes"]) == seen[row["client"]]
    assert record["upload_bytes"] == sum(up for _, up in seen.values())
    assert record["download_bytes"] == sum(down for down, _ in seen.values())


def test_an_upload_claiming_more_examples_than_its_client_holds_is_rejected(synthetic_csv):
    """The example count an upload claims is its weight in the aggregate; the server drew the
    partition and knows each client's count, so a client claiming 5× its own (to outweigh the
    others) is rejected with the reason, and the round aggregates the honest ones."""
    class Inflating(LocalTransport):
        def exchange(self, exp, rnd, tasks, on_client):
            replies = super().exchange(exp, rnd, tasks, on_client)
            upd = Update.from_payload(decode(replies[2].blob))
            upd.num_examples *= 5
            replies[2] = Reply(encode(upd.to_payload()))
            return replies

    exp = tiny_exp(synthetic_csv, "strategy.name=fl-lora")
    state = exp.strategy.init_state(exp.runtime.initial_state())
    _, record = run_round_over(exp, 1, state, Inflating(), None)
    held = len(exp.client_train[2])
    row = next(r for r in record["per_client"] if r["client"] == 2)
    assert row["rejected"] == (f"upload claims {5 * held} training examples; client 2 holds "
                               f"{held} in the partition")
    assert record["status"] == "ok" and record["num_replies"] == 3


# ---------------------------------------------------------------------- dropouts
def test_dropout_half_renormalises_weights_by_hand(synthetic_csv):
    exp = tiny_exp(synthetic_csv, "strategy.name=fl-lora", "train.dropout=0.5", "seed=3")
    s = exp.strategy
    state = s.init_state(exp.runtime.initial_state())
    new, record = run_round(exp, 1, state)
    replied = [c for c in record["clients"] if c not in record["dropped"]]
    assert record["dropped"] and replied, "seed 3 drops some but not all of 4 clients"
    assert record["dropped"] == [c for c in range(4) if drops_out(exp.cfg.seed, 1, c, 0.5)]
    # By hand: rerun each replying client (deterministic) and average its factors with
    # weights n_k / Σ_{replied} n_j.
    finals, sizes = [], []
    for c in replied:
        ctx = ClientContext(exp.runtime, exp.enc_train, exp.client_train[c], exp.cfg)
        s.client_update(ctx, s.configure(1, c, state))
        finals.append(exp.runtime.snapshot(list(state.tensors)))
        sizes.append(len(exp.client_train[c]))
    for name in state.tensors:
        expected = sum(n / sum(sizes) * f[name].double() for n, f in zip(sizes, finals))
        assert torch.allclose(new.tensors[name].double(), expected, atol=1e-6)
    assert all(c["upload_bytes"] == 0 for c in record["per_client"] if c.get("dropped"))


def test_too_few_replies_fail_the_round_and_keep_the_state(synthetic_csv):
    exp = tiny_exp(synthetic_csv, "strategy.name=fl-lora", "train.dropout=0.5", "seed=3",
                   "train.min_replies=4")
    s = exp.strategy
    state = s.init_state(exp.runtime.initial_state())
    new, record = run_round(exp, 1, state)
    assert record["status"] == "failed"
    assert all(torch.equal(new.tensors[n], state.tensors[n]) for n in state.tensors)


def test_run_with_dropouts_completes(tmp_path, synthetic_csv):
    out = run_cli(tmp_path / "d", "train.dropout=0.5", "train.rounds=3", data=synthetic_csv,
                  base=TINY)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dropped_clients"] > 0


# ---------------------------------------------------------------------- crash-safe resume
def _cli(out: Path, csv: Path, rounds: int, *extra: str) -> list[str]:
    args = [sys.executable, "-m", "lora_a2.cli", "run", "--quiet", "--out", str(out),
            "--set", f"data.name=csv:{csv}", "--set", f"train.rounds={rounds}"]
    for s in TINY + list(extra):
        args += ["--set", s]
    return args


def _crashed_at(out: Path, argv: list[str], rnd: int) -> None:
    """Run ``argv`` in this process and stop it as Ctrl-C would as round ``rnd`` starts:
    rounds before it are recorded and checkpointed, nothing of it is."""
    real = runner_module.run_round

    def crashing(exp, r, state, **kw):
        if r == rnd:
            raise KeyboardInterrupt
        return real(exp, r, state, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runner_module, "run_round", crashing)
        assert main(argv) == 130
    assert [r["round"] for r in read_metrics(out / "metrics.jsonl")] == list(range(1, rnd))
    assert not (out / "summary.json").exists()


def _final(out: Path):
    records = [{k: v for k, v in r.items() if not k.endswith("wall_s")}
               for r in read_metrics(out / "metrics.jsonl")]
    return records, (out / "adapter" / "adapter_model.safetensors").read_bytes()


def _kill_after(args, out: Path, lines: int, delay: float) -> None:
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            m = out / "metrics.jsonl"
            if m.exists() and m.read_bytes().count(b"\n") >= lines:
                break
            if proc.poll() is not None:
                break
            time.sleep(0.01)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()


KILL_POINTS = [(1, 0.0), (3, 0.05)]


def test_sigkill_then_resume_equals_uninterrupted(tmp_path, synthetic_csv):
    rounds = 6
    ref = tmp_path / "ref"
    # only the killed runs need a process of their own; the reference and the resumes run
    # in-process (the same seeded computation: one torch thread either way)
    assert main(_cli(ref, synthetic_csv, rounds, "strategy.name=lora-a2")[3:]) == 0
    expected = _final(ref)
    for i, (lines, delay) in enumerate(KILL_POINTS):
        out = tmp_path / f"k{i}"
        _kill_after(_cli(out, synthetic_csv, rounds, "strategy.name=lora-a2"), out, lines, delay)
        done = read_metrics(out / "metrics.jsonl") if (out / "metrics.jsonl").exists() else []
        assert lines <= len(done) < rounds, "the kill came too early or too late to test anything"
        assert main(["run", "--quiet", "--resume", str(out)]) == 0
        got = _final(out)
        assert got[0] == expected[0]
        assert got[1] == expected[1]
        # its wall time is the whole run's: this session's, plus the rounds run before the kill
        summary = json.loads((out / "summary.json").read_text())
        before = [r for r in read_metrics(out / "metrics.jsonl")
                  if r["round"] <= summary["resumed_from_round"]]
        assert summary["wall_s"] == pytest.approx(
            summary["session_wall_s"] + sum(r["wall_s"] for r in before), rel=1e-12)
        # the kill lands after `lines` lines, maybe before that round's checkpoint
        assert summary["resumed_from_round"] >= lines - 1
        assert summary["session_wall_s"] < summary["wall_s"] or not before


def test_torn_metrics_line_is_dropped_on_resume(tmp_path, synthetic_csv):
    def args(out, rounds):
        return _cli(out, synthetic_csv, rounds)[3:]  # the same flags, for main() in-process

    assert main(args(tmp_path / "ref", 2)) == 0
    out = tmp_path / "t"
    # A 2-round run that crashed while writing round 2's metrics line: round 1 complete and
    # checkpointed, then a torn line (the checkpoint of round 2 is only written after its line).
    _crashed_at(out, args(out, 2), 2)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"round":2,"strategy":"lora-a2","accur')
    assert main(["run", "--quiet", "--resume", str(out)]) == 0
    again = _final(out)
    assert [r["round"] for r in again[0]] == [1, 2]
    assert again == _final(tmp_path / "ref")


def test_a_round_written_twice_is_kept_once_on_resume(tmp_path, synthetic_csv):
    """Two processes that ran the same folder at once can leave a round's line twice (seen once
    in a benchmark cell after its lock file was deleted by hand): the resume keeps one line per
    round, so the per-round records and the summary's totals equal an uninterrupted run's."""
    def args(out, rounds):
        return _cli(out, synthetic_csv, rounds)[3:]  # the same flags, for main() in-process

    assert main(args(tmp_path / "ref", 3)) == 0
    out = tmp_path / "d"
    _crashed_at(out, args(out, 3), 3)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("\n".join([lines[0], lines[1], lines[1]]) + "\n")
    assert main(["run", "--quiet", "--resume", str(out)]) == 0
    got = _final(out)
    assert [r["round"] for r in got[0]] == [1, 2, 3]
    assert got == _final(tmp_path / "ref")
    totals = ("total_upload_bytes", "total_download_bytes", "total_upload_params")
    ref = json.loads((tmp_path / "ref" / "summary.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert {k: summary[k] for k in totals} == {k: ref[k] for k in totals}


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize("sets,needle", [
    (["strategy.name=fedprox"], "unknown strategy"),
    (["data.name=nonexistent-corpus"], "nonexistent-corpus"),
    (["model.name=/no/such/model/folder"], "/no/such/model/folder"),
    (["data.alpha=-0.5"], "data.alpha"),
    (["strategy.rank_budget=5"], "strategy.rank_budget"),
    (["train.rounds=-1"], "train.rounds"),
    (["train.clients_per_round=1.5"], "train.clients_per_round"),
    (["train.dropout=1.0"], "train.dropout"),
    (["data.num_clients=500"], "clients"),
    (["model.max_length=1024"], "must be ≤ 512, the positions"),  # tiny-random-bert's table
    ([f"seed={2**64}"], "seed"),
    (["strategy.lr=inf"], "'strategy.lr' must be a finite number"),
    (["model.lora_alpha=nan"], "'model.lora_alpha' must be a finite number"),
    (["model.init_std=inf"], "'model.init_std' must be a finite number"),
    (["strategy.options.probe_fraction=nan"], "'strategy.options.probe_fraction' must be a "
                                              "finite number"),
])
def test_bad_input_one_line_exit_2(tmp_path, synthetic_csv, capsys, sets, needle):
    run_cli(tmp_path / "o", *sets, data=synthetic_csv, base=TINY, code=2)
    err = capsys.readouterr().err.strip()
    assert needle in err and err.count("\n") == 0, err


@pytest.mark.parametrize("content,needle", [
    (b"", "empty"),
    (b"\xff\xfe\x00garbage\x00\x00", "bad.csv"),
    (b"text,lbl\nhello,1\n", "'label'"),
    (b"txt,label\nhello,1\n", "'text'"),
])
def test_bad_data_files(tmp_path, capsys, content, needle):
    bad = tmp_path / "bad.csv"
    bad.write_bytes(content)
    run_cli(tmp_path / "o", data=bad, base=TINY, code=2)
    err = capsys.readouterr().err.strip()
    assert needle in err and err.count("\n") == 0, err


def test_a_file_system_refusal_is_one_line_exit_2(monkeypatch, capsys):
    """A path the file system refuses (a folder the user may not enter, a name too long)
    anywhere below a command: one line naming the path, exit 2, no traceback."""
    import lora_a2.cli as cli

    def refused(_):
        raise PermissionError(13, "Permission denied", "/root/data.csv")

    monkeypatch.setattr(cli, "_cmd_config", refused)
    assert main(["config"]) == 2
    assert capsys.readouterr().err.strip() == "lora-a2: error: /root/data.csv: Permission denied"

    def no_path(_):  # an OSError about no path (a socket, a library's): its traceback stays
        raise ConnectionResetError(104, "Connection reset by peer")

    monkeypatch.setattr(cli, "_cmd_config", no_path)
    with pytest.raises(ConnectionResetError):
        main(["config"])


def test_json_output_is_checked_for_writing_before_measuring(tmp_path, monkeypatch, capsys):
    out = tmp_path / "audit.json"
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path)
    assert main(["audit-privacy", "--quick", "--json", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"lora-a2: error: --json: '{tmp_path}' is not writable", err


def test_a_run_folder_in_use_is_refused_to_a_second_process(tmp_path, synthetic_csv, capsys):
    """While one process holds a run folder's lock (here: a child process that took it), a
    resume or an --overwrite of that folder is one line, exit 2, and the folder is untouched;
    once the holder is gone (killed: the kernel drops the lock), the resume goes ahead."""
    out = run_cli(tmp_path / "r", "train.rounds=1", data=synthetic_csv, base=TINY)
    assert not (out / RUN_LOCK).exists()  # released at the end of the run
    (out / "summary.json").unlink()  # as if it had been stopped before its summary
    before = _snapshot(out)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from lora_a2.locks import take_lock; "
         f"assert take_lock(__import__('pathlib').Path({str(out / RUN_LOCK)!r})) is not None; "
         "print('held', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["run", "--quiet", "--resume", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert "is in use by another lora-a2 process" in err and err.count("\n") == 0, err
        run_cli(out, "train.rounds=1", data=synthetic_csv, base=TINY, code=2,
                args=("--overwrite",))
        assert "while another lora-a2 process runs in it" in capsys.readouterr().err
        assert {k: v for k, v in _snapshot(out).items() if k != RUN_LOCK} == before
    finally:
        holder.kill()
        holder.wait()
    # a lock file left naming another host (a container rescheduled under a new name) whose
    # flock nobody holds does not block the folder: the run-folder lock trusts flock alone
    (out / RUN_LOCK).write_text("some-other-host 4242\n")
    assert main(["run", "--quiet", "--resume", str(out)]) == 0
    assert (out / "summary.json").exists() and not (out / RUN_LOCK).exists()


def test_damaged_run_files_on_resume(tmp_path, synthetic_csv, capsys):
    """--resume of a folder whose derived files were damaged: an initial_eval.json cut short is
    recomputed (the run ends as an undamaged one does); a kept metrics line that is not a
    round's record, or a privacy ledger with a round that is not a number, that is missing or
    that does not count a kept round, is one line, exit 2, and the folder is left as it was."""
    ref = run_cli(tmp_path / "ref", "train.rounds=2", data=synthetic_csv, base=TINY)
    out = run_cli(tmp_path / "r", "train.rounds=2", data=synthetic_csv, base=TINY)
    (out / "summary.json").unlink()
    (out / "initial_eval.json").write_text('{"accuracy": 0.')
    assert main(["run", "--quiet", "--resume", str(out)]) == 0
    assert json.loads((out / "initial_eval.json").read_text()) == \
        json.loads((ref / "initial_eval.json").read_text())
    # a JSON object without the run's metric: recomputed too, not a KeyError after the rounds
    (out / "summary.json").unlink()
    (out / "initial_eval.json").write_text("{}")
    assert main(["run", "--quiet", "--resume", str(out)]) == 0
    assert json.loads((out / "initial_eval.json").read_text()) == \
        json.loads((ref / "initial_eval.json").read_text())
    (out / "summary.json").unlink()
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text('{"round": 1}\n' + lines[1] + "\n")
    before = _snapshot(out)
    assert main(["run", "--quiet", "--resume", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "is not a round's record" in err and err.count("\n") == 0, err
    assert _snapshot(out) == before
    dp = run_cli(tmp_path / "dp", "train.rounds=1", "privacy.mechanism=gaussian",
                 "privacy.noise_multiplier=1", "privacy.noise_source=os",
                 data=synthetic_csv, base=TINY)
    (dp / "summary.json").unlink()
    (dp / "privacy_ledger.json").write_text('{"attempts": {"one": 1}}')
    assert main(["run", "--quiet", "--resume", str(dp)]) == 2
    assert "is not a privacy ledger" in capsys.readouterr().err
    # a ledger that is gone, or that does not count a kept round: ε would be under-charged.
    # Refused before the folder changes: a metrics line past the checkpoint (a crash between
    # the line and its checkpoint) is not truncated, a missing initial_eval.json not rewritten
    (dp / "initial_eval.json").unlink()
    row = json.loads((dp / "metrics.jsonl").read_text().splitlines()[-1])
    with open(dp / "metrics.jsonl", "a") as f:
        f.write(json.dumps({**row, "round": 2}) + "\n")
    for ledger, says in ((None, "privacy_ledger.json is missing"),
                         ('{"attempts": {}}', "counts no attempt of round(s) 1")):
        if ledger is None:
            (dp / "privacy_ledger.json").unlink()
        else:
            (dp / "privacy_ledger.json").write_text(ledger)
        before = _snapshot(dp)
        assert main(["run", "--quiet", "--resume", str(dp)]) == 2
        err = capsys.readouterr().err.strip()
        assert says in err and "cannot know" in err and err.count("\n") == 0, err
        assert _snapshot(dp) == before


def test_resume_misuse(tmp_path, capsys):
    assert main(["run", "--resume", str(tmp_path / "none")]) == 2
    assert "no config.toml" in capsys.readouterr().err
    assert main(["run", "--resume", str(tmp_path), "--set", "seed=1"]) == 2
    assert "do not combine" in capsys.readouterr().err
    # an empty folder name is the current folder to Path: it ran into runs/<time> (--out) or
    # would resume whatever run the working directory is
    for argv in (["run", "--out", ""], ["run", "--resume", " "], ["bench", "smoke", "--out", ""]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"{argv[-2]} needs a folder name, got an empty one" in err and \
            err.count("\n") == 1, err


def test_a_resume_continues_only_the_run_its_checkpoint_ran(tmp_path, synthetic_csv, capsys,
                                                             monkeypatch):
    """The checkpoint keeps what the run is (its config, its data's digest): a config.toml
    edited since the run started, or data that differ from what it trained on — the same
    relative path read from another folder — is refused with one line, the folder untouched.
    The same run from where it started resumes."""
    home, elsewhere = tmp_path / "home", tmp_path / "elsewhere"
    home.mkdir()
    elsewhere.mkdir()
    (home / "toy.csv").write_bytes(synthetic_csv.read_bytes())
    head, *rows = synthetic_csv.read_text().splitlines()
    (elsewhere / "toy.csv").write_text("\n".join([head, *rows[::-1]]) + "\n")  # same rows
    monkeypatch.chdir(home)
    out = run_cli(tmp_path / "run", "train.rounds=2", data="csv:toy.csv", base=TINY)
    toml = (out / "config.toml").read_text()
    assert "num_clients = 4" in toml
    (out / "config.toml").write_text(toml.replace("num_clients = 4", "num_clients = 5"))
    before = _snapshot(out)
    assert main(["run", "--quiet", "--resume", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "'data.num_clients' = 5" in err and "started with 4" in err
    assert _snapshot(out) == before
    (out / "config.toml").write_text(toml)
    monkeypatch.chdir(elsewhere)
    before = _snapshot(out)
    assert main(["run", "--quiet", "--resume", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "data read now differ" in err, err
    assert _snapshot(out) == before
    monkeypatch.chdir(home)
    # where it runs and what it reports to may change (engine.*, report.*)
    assert "threads = 1" in toml
    (out / "config.toml").write_text(toml.replace("threads = 1", "threads = 2"))
    assert main(["run", "--quiet", "--resume", str(out)]) == 0
    assert [r["round"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2]


def test_the_data_digest_sees_every_part_of_the_data():
    """One token, mask bit or label of either set, or one client's index, changes the digest;
    equal data give equal digests."""
    def exp(**change):
        gen = torch.Generator().manual_seed(0)
        parts = {n: torch.randint(0, 50, (6, 5), generator=gen) for n in
                 ("train_ids", "test_ids", "train_mask", "test_mask")}
        parts |= {"train_labels": torch.arange(6), "test_labels": torch.arange(6) % 2,
                  "client_train": [np.array([0, 1, 2]), np.array([3, 4, 5])],
                  "client_test": [np.array([], dtype=np.int64)] * 2}
        parts |= change
        return SimpleNamespace(
            enc_train=EncodedData(parts["train_ids"], parts["train_mask"], parts["train_labels"]),
            enc_test=EncodedData(parts["test_ids"], parts["test_mask"], parts["test_labels"]),
            client_train=parts["client_train"], client_test=parts["client_test"])

    base = data_digest(exp())
    assert data_digest(exp()) == base
    for name in ("train_ids", "test_ids", "train_mask", "test_mask"):
        t = getattr(getattr(exp(), "enc_" + name.split("_")[0]),
                    "input_ids" if name.endswith("ids") else "attention_mask").clone()
        t[2, 3] += 1
        assert data_digest(exp(**{name: t})) != base, name
    assert data_digest(exp(train_labels=torch.tensor([0, 1, 2, 3, 4, 6]))) != base
    assert data_digest(exp(test_labels=torch.tensor([0, 1, 0, 1, 0, 0]))) != base
    moved = [np.array([0, 1]), np.array([2, 3, 4, 5])]  # the same indices, split otherwise
    assert data_digest(exp(client_train=moved)) != base
    assert data_digest(exp(client_test=[np.array([0]), np.array([], dtype=np.int64)])) != base


def test_a_run_that_diverges_stops_with_one_line_and_keeps_its_rounds(tmp_path, synthetic_csv,
                                                                       capsys, monkeypatch):
    """A round whose global state holds a NaN or an inf (a diverged run: an lr or a server step
    too large) stops the run, exit 2, one line; nothing of that round is recorded, the rounds
    before it and their checkpoint stay (it was evaluated and reported as a result before)."""
    real = runner_module.run_round

    def diverging(exp, r, state, **kw):
        state, record = real(exp, r, state, **kw)
        if r == 2:
            name = sorted(state.tensors)[1]
            state.tensors[name] = state.tensors[name].clone().fill_(float("inf"))
        return state, record

    monkeypatch.setattr(runner_module, "run_round", diverging)
    out = run_cli(tmp_path / "d", "train.rounds=3", data=synthetic_csv, base=TINY, code=2)
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "round 2: the global model has non-finite values" in err
    assert [r["round"] for r in read_metrics(out / "metrics.jsonl")] == [1]
    assert load_checkpoint(out)[0] == 1 and not (out / "summary.json").exists()


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_overwrite_deletes_only_a_run_folder_and_only_once_the_new_run_can_start(
        tmp_path, synthetic_csv, capsys, monkeypatch):
    """--overwrite is checked before anything is deleted: a folder that is not a run's, or
    that holds the working directory, is refused; and a run's folder survives a new config
    whose model or data fail to load."""
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.tex").write_text("years of work")
    run_cli(notes, "train.rounds=1", data=synthetic_csv, base=TINY, code=2,
            args=("--overwrite",))
    assert "holds no config.toml" in capsys.readouterr().err
    assert (notes / "thesis.tex").read_text() == "years of work"

    home = tmp_path / "project"
    (home / "sub").mkdir(parents=True)
    (home / "config.toml").write_text("# the user's own config, not a run\n")
    (home / "sub" / "config.toml").write_text("# and another\n")
    monkeypatch.chdir(home / "sub")
    for target in (".", ".."):
        run_cli(Path(target), "train.rounds=1", data=synthetic_csv, base=TINY, code=2,
                args=("--overwrite",))
        assert "current directory" in capsys.readouterr().err
    assert (home / "config.toml").exists() and (home / "sub" / "config.toml").exists()

    # a run's folder that holds the run's own config file or data: kept
    proj = run_cli(tmp_path / "proj", "train.rounds=1", data=synthetic_csv, base=TINY)
    (proj / "my.toml").write_text("seed = 3\n")
    (proj / "my.csv").write_bytes(synthetic_csv.read_bytes())
    kept = _snapshot(proj)
    assert main(["run", "--quiet", "--overwrite", "--out", str(proj), "-c", str(proj / "my.toml"),
                 "--set", f"data.name=csv:{synthetic_csv}", *[x for s in TINY for x in
                                                            ("--set", s)]]) == 2
    assert "which this run reads" in capsys.readouterr().err
    with pytest.raises(UserError, match="which this run reads"):  # the Python API: the same
        lora_a2.run(str(proj / "my.toml"), out=proj, overwrite=True,
                    overrides=[f"data.name=csv:{synthetic_csv}", *TINY])
    with pytest.raises(UserError, match="which this run reads"):  # the Deployment ServerApp's
        run_experiment(load_config(None, [f"data.name=csv:{synthetic_csv}", *TINY]), proj,
                       overwrite=True, inputs=[proj / "my.toml"])
    assert _snapshot(proj) == kept
    run_cli(proj, "train.rounds=1", data=proj / "my.csv", base=TINY, code=2,
            args=("--overwrite",))
    err = capsys.readouterr().err
    assert "which this run reads" in err and "my.csv" in err
    (proj / "ds").mkdir()  # a saved hub dataset folder, read with a config name after it
    (proj / "ds" / "dataset_dict.json").write_text('{"splits": ["train"]}')
    kept = _snapshot(proj)
    run_cli(proj, "train.rounds=1", data=f"hf:{proj / 'ds'}:default", base=TINY, code=2,
            args=("--overwrite",))
    err = capsys.readouterr().err
    assert "which this run reads" in err and "ds" in err
    assert _snapshot(proj) == kept

    old = run_cli(tmp_path / "old", "train.rounds=1", data=synthetic_csv, base=TINY)
    before = _snapshot(old)
    for bad in (["model.name=/no/such/model/folder"], ["data.name=csv:/no/such/file.csv"]):
        run_cli(old, "train.rounds=1", *bad, base=TINY, code=2, args=("--overwrite",))
        assert "no/such" in capsys.readouterr().err
        assert _snapshot(old) == before
    run_cli(old, "train.rounds=2", data=synthetic_csv, base=TINY, args=("--overwrite",))
    assert [r["round"] for r in read_metrics(old / "metrics.jsonl")] == [1, 2]


def test_a_damaged_checkpoint_is_one_line_and_the_folder_is_kept(tmp_path, synthetic_csv, capsys):
    """A checkpoint cut short, one that parses but lacks a state tensor, or one with a client
    key that names no client, is refused."""
    out = run_cli(tmp_path / "a", "train.rounds=2", data=synthetic_csv, base=TINY)
    ckpt = out / "checkpoint.safetensors"
    whole = ckpt.read_bytes()  # read into memory: the file is rewritten below (no mmap)
    meta = json.loads(whole[8:8 + int.from_bytes(whole[:8], "little")])["__metadata__"]
    tensors = load_bytes(whole)
    state_key = next(k for k in tensors if k.startswith("state/"))
    for damage in ("cut", "missing", "foreign"):
        if damage == "cut":
            ckpt.write_bytes(whole[: len(whole) // 2])
        elif damage == "missing":
            save_file({k: v for k, v in tensors.items() if k != state_key}, str(ckpt), meta)
        else:  # a client key that names no client: "client/x" without "/name"
            save_file({**tensors, "client/x": torch.zeros(1)}, str(ckpt), meta)
        before = _snapshot(out)
        assert main(["run", "--quiet", "--resume", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "is unreadable; cannot resume this run" in err, err
        assert _snapshot(out) == before


def test_resume_refuses_a_lost_checkpoint_or_lost_metrics_lines(tmp_path, synthetic_csv,
                                                                 capsys):
    """A resume that would silently rerun recorded rounds, or sum a record with rounds
    missing, is refused and leaves the folder as it was."""
    out = run_cli(tmp_path / "a", "train.rounds=2", data=synthetic_csv, base=TINY)
    (out / "checkpoint.safetensors").unlink()
    (out / "summary.json").unlink()  # as if it crashed in round 3 of a longer run
    before = _snapshot(out)
    assert main(["run", "--quiet", "--resume", str(out)]) == 2
    assert "no checkpoint.safetensors" in capsys.readouterr().err
    assert _snapshot(out) == before

    out = run_cli(tmp_path / "b", "train.rounds=2", data=synthetic_csv, base=TINY)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text(lines[1] + "\n")  # round 1's line lost
    before = _snapshot(out)
    assert main(["run", "--quiet", "--resume", str(out)]) == 2
    assert "metrics.jsonl lacks round(s) 1 that the checkpoint (round 2)" in \
        capsys.readouterr().err
    assert _snapshot(out) == before

    # central DP: the trusted server's full record is checked too
    central = ["privacy.mechanism=gaussian", "privacy.mode=central",
               "privacy.noise_multiplier=1", "privacy.clip=0.1", "privacy.noise_source=seeded"]
    out = run_cli(tmp_path / "c", "train.rounds=2", *central, data=synthetic_csv, base=TINY)
    lines = (out / "server_log.jsonl").read_text().splitlines()
    (out / "server_log.jsonl").write_text(lines[1] + "\n")
    before = _snapshot(out)
    assert main(["run", "--quiet", "--resume", str(out)]) == 2
    assert "server_log.jsonl lacks round(s) 1 that the checkpoint (round 2)" in \
        capsys.readouterr().err
    assert _snapshot(out) == before
    (out / "server_log.jsonl").unlink()  # the whole record lost: refused as well
    before = _snapshot(out)
    assert main(["run", "--quiet", "--resume", str(out)]) == 2
    assert "server_log.jsonl lacks round(s) 1, 2 that the checkpoint (round 2)" in \
        capsys.readouterr().err
    assert _snapshot(out) == before


def test_resume_takes_the_lines_a_crash_leaves_before_a_checkpoint(tmp_path, synthetic_csv):
    """What a crash between a round's metrics line and its checkpoint leaves is resumable, and
    ends as an uninterrupted run: round 1's line with no checkpoint at all, and round 2's line
    with the checkpoint still at round 1."""
    def args(out, rounds):
        return _cli(out, synthetic_csv, rounds)[3:]

    assert main(args(tmp_path / "ref", 2)) == 0
    ref_lines = (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()
    for name, keep_checkpoint in (("no-ckpt", False), ("ckpt-1", True)):
        out = tmp_path / name
        _crashed_at(out, args(out, 2), 2)
        if keep_checkpoint:  # round 2's line written, its checkpoint not
            with open(out / "metrics.jsonl", "a") as f:
                f.write(ref_lines[1] + "\n")
        else:  # round 1's line written, its checkpoint not
            (out / "checkpoint.safetensors").unlink()
        assert main(["run", "--quiet", "--resume", str(out)]) == 0, name
        assert _final(out) == _final(tmp_path / "ref"), name


def test_an_out_inside_a_file_is_refused_before_anything_loads(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match="is inside .*afile', which is not a directory"):
        check_out_dir(tmp_path / "afile" / "sub" / "run", overwrite=False)
    check_out_dir(tmp_path / "new" / "sub" / "run", overwrite=False)  # made when the run starts


def test_a_run_folder_taken_while_this_run_loaded_is_not_deleted(tmp_path):
    """--out is checked before the model loads and again before the folder is set up: a run
    that started writing there in between is refused, not deleted."""
    out = tmp_path / "o"
    check_out_dir(out, overwrite=False)  # free when this run starts loading
    out.mkdir()
    (out / "config.toml").write_text("# another run, started meanwhile\n")
    with pytest.raises(UserError, match="is not empty"):
        replace_out_dir(out, overwrite=False)
    assert (out / "config.toml").exists()


def test_overwrite_takes_the_folder_s_lock_before_it_deletes_anything(tmp_path, monkeypatch):
    """Another process that takes the run folder's lock right after this one checked it (a
    --resume starting there): --overwrite is refused and nothing of that run is deleted (the
    folder was emptied first and locked after, so both ran in it)."""
    from lora_a2 import runner
    from lora_a2.locks import release_lock, take_lock

    out = tmp_path / "o"
    out.mkdir()
    (out / "config.toml").write_text("seed = 1\n")
    (out / "metrics.jsonl").write_text("{}\n")
    taken: list[int] = []

    def held_after_the_check(path, other_hosts=True):
        fd = take_lock(out / RUN_LOCK, other_hosts=False)  # the other process, just now
        assert fd is not None
        taken.append(fd)
        return False  # it was free when looked at

    monkeypatch.setattr(runner, "lock_held", held_after_the_check)
    with pytest.raises(UserError, match="is in use by another lora-a2 process"):
        replace_out_dir(out, overwrite=True)
    assert (out / "config.toml").exists() and (out / "metrics.jsonl").exists()
    release_lock(out / RUN_LOCK, taken[0])
    monkeypatch.undo()
    replace_out_dir(out, overwrite=True)  # free now: emptied, its lock let go
    assert list(out.iterdir()) == []


def test_a_lock_file_made_anew_by_another_process_is_not_deleted_on_release(tmp_path):
    from lora_a2.locks import release_lock, take_lock

    path = tmp_path / RUN_LOCK
    fd = take_lock(path, other_hosts=False)
    path.unlink()  # someone removed it and another process made its own
    other = take_lock(path, other_hosts=False)
    assert other is not None
    release_lock(path, fd)
    assert path.exists()  # still the other's
    release_lock(path, other)
    assert not path.exists()


@pytest.mark.slow
def test_sigkill_at_many_points(tmp_path, synthetic_csv):
    """More kill points (after each round's line, with delays that land inside the next round's
    training, its metrics write or its checkpoint write). Run with ``-m slow``."""
    rounds = 6
    ref = tmp_path / "ref"
    subprocess.run(_cli(ref, synthetic_csv, rounds, "strategy.name=fl-lora"), check=True,
                   capture_output=True)
    expected = _final(ref)
    points = [(lines, delay) for lines in (0, 1, 2, 3, 4, 5) for delay in (0.0, 0.03, 0.11)]
    tried = 0
    for i, (lines, delay) in enumerate(points):
        out = tmp_path / f"k{i}"
        _kill_after(_cli(out, synthetic_csv, rounds, "strategy.name=fl-lora"), out, lines, delay)
        if (out / "summary.json").exists():
            continue  # the run finished before the kill landed
        tried += 1
        if not (out / "config.toml").exists():
            continue  # killed before the run existed: nothing to resume, nothing lost
        r = subprocess.run([sys.executable, "-m", "lora_a2.cli", "run", "--quiet", "--resume",
                            str(out)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert _final(out) == expected, (lines, delay)
    assert tried >= 12


def test_rows_skipped_from_a_classification_file_are_counted_and_reported(tmp_path, capsys):
    """Empty text or label cells are skipped, and the run says how many and why."""
    from conftest import synthetic_texts

    texts, labels = synthetic_texts(60)
    lines = ["text,label"] + [f"{t},{'abc'[y]}" for t, y in zip(texts, labels)]
    lines[1] = ",a"  # empty text
    lines[2] = "some text,"  # empty label
    lines[3] = lines[4]  # a duplicate is kept in user files (taken as given)
    path = tmp_path / "holes.csv"
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "o"
    assert main(["run", "--out", str(out), "--quiet", "--set", f"data.name=csv:{path}",
                 "--set", "model.name=tiny-random-bert", "--set", "train.rounds=1",
                 "--set", "data.num_clients=2"]) == 0
    rows = json.loads((out / "summary.json").read_text())["data_rows"]
    assert rows == {"read": 60, "kept": 58, "skipped": {"empty text or label": 2}}
    assert "60 rows read, 58 kept; skipped: 2 empty text or label" in capsys.readouterr().out


def test_a_checkpoint_round_trips_every_kind_of_extra_state(tmp_path):
    """What a strategy may keep in ServerState.extra comes back from the checkpoint as it
    went in: a tensor, a dict of tensors, a list of tensors (each with its dtype), and plain
    JSON values; the global tensors keep their order."""
    from lora_a2.checkpoint import load_checkpoint, save_checkpoint
    from lora_a2.messages import ServerState

    extra = {"t": torch.arange(3, dtype=torch.float64),
             "d": {"x": torch.ones(2, dtype=torch.bfloat16), "7": torch.zeros(1, dtype=torch.int64)},
             "l": [torch.full((2,), 3.0), torch.tensor([1], dtype=torch.int32)],
             "n": 4, "s": "text", "ints": [1, 2], "empty": [], "nested": {"a": [1.5, None]}}
    state = ServerState({"z": torch.randn(2, 2), "a": torch.randn(3)}, extra)
    save_checkpoint(tmp_path, 5, state)
    rnd, back = load_checkpoint(tmp_path)
    assert rnd == 5 and list(back.tensors) == ["z", "a"]
    assert all(torch.equal(back.tensors[k], state.tensors[k]) for k in state.tensors)
    assert back.extra.keys() == extra.keys()
    for key, value in extra.items():
        got = back.extra[key]
        if isinstance(value, torch.Tensor):
            assert got.dtype == value.dtype and torch.equal(got, value)
        elif key == "d":
            assert list(got) == ["x", "7"] and all(
                got[k].dtype == v.dtype and torch.equal(got[k], v) for k, v in value.items())
        elif key == "l":
            assert len(got) == 2 and all(
                g.dtype == v.dtype and torch.equal(g, v) for g, v in zip(got, value))
        else:
            assert got == value, key
