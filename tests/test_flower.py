"""The Flower engine on its Simulation Engine (Ray): the same metrics and bytes as the local
engine, node failures, and SecAgg+. The Deployment Engine is tests/test_flower_deployment.py."""

from __future__ import annotations

import json
import tomllib

import numpy as np
import pytest

pytest.importorskip("flwr")

from types import SimpleNamespace  # noqa: E402

from flwr.server.workflow import SecAggPlusWorkflow  # noqa: E402
from flwr.superlink.grid.inmemory_grid import InMemoryGrid  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from lora_a2.checks import load_config  # noqa: E402
from lora_a2.cli import main  # noqa: E402
from lora_a2.config.validate import secagg_shares  # noqa: E402
from lora_a2.errors import UserError  # noqa: E402
from flwr.common import bytes_to_ndarray  # noqa: E402

from lora_a2.engines import secagg  # noqa: E402
from lora_a2.engines.flower import clientapp  # noqa: E402
from lora_a2.engines.flower.records import CONFIG_RECORD  # noqa: E402
from lora_a2.engines.flower.transport import FlowerRounds  # noqa: E402
from lora_a2.payload import InvalidPayload, encode  # noqa: E402
from lora_a2.report import read_metrics  # noqa: E402
from lora_a2.runner import _secagg_summary  # noqa: E402
from lora_a2.strategies import REGISTRY, Task  # noqa: E402
from lora_a2.tasks.classification import Classification  # noqa: E402

from conftest import TINY, tiny_setup  # noqa: E402

from flower_util import (FLOWER_EVAL, FLOWER_ONLY, assert_same_run,  # noqa: E402
                         final_state, max_diff, run, run_local_failing, simulate_together)


# Ray and Flower processes: one test at a time (one xdist worker)
pytestmark = pytest.mark.xdist_group("flower")

# Runs that can share one Flower simulation do (Ray and its worker processes start once, ≈ 20 s
# each time on 2 cores): one simulation of 4 clients, one of 3. Session-scoped: xdist may run
# another module's test between two of these, which would tear a module-scoped one down.
SECAGG_STRATEGIES = ["lora-a2", "fl-lora"]
DP_CASES = [
    ("lora-a2", ["privacy.mechanism=gaussian", "privacy.mode=local", "privacy.noise_multiplier=0.5",
                 "privacy.noise_source=seeded"]),
    ("fl-lora", ["privacy.mechanism=gaussian", "privacy.mode=central", "privacy.epsilon=8.0",
                 "privacy.noise_source=seeded"]),
    ("flexlora", []),
    ("lora-a2", ["privacy.mechanism=laplace", "privacy.mode=local", "privacy.epsilon=40",
                 "privacy.selection=private", "privacy.selection_epsilon=2",
                 "privacy.noise_source=seeded"]),
]
NEWER = ["rolora", "fedsa-lora", "fedex-lora", "fedsvd"]
FLEET = ["train.rounds=2", "fleet.profile=mixed", "train.deadline_s=0.025"]
LOCAL_DP = ["privacy.mechanism=gaussian", "privacy.mode=local", "privacy.noise_multiplier=0.5",
            "privacy.noise_source=seeded"]
RUNS4 = {"plain": ["train.rounds=2"], "fleet": FLEET,
         **{f"secagg-{s}": ["train.rounds=1", f"strategy.name={s}", "secagg.enabled=true"]
            for s in SECAGG_STRATEGIES},
         "secagg-dp": ["train.rounds=1", "strategy.name=fl-lora", "secagg.enabled=true",
                       *LOCAL_DP]}
RUNS3 = {**{f"dp{i}": ["train.rounds=2", f"strategy.name={s}", *p]
            for i, (s, p) in enumerate(DP_CASES)},
         **{s: ["train.rounds=3", f"strategy.name={s}"] for s in NEWER}}


@pytest.fixture(scope="session")
def sim4_seen(tmp_path_factory, session_csv):
    """RUNS4 in one simulation of 4 clients: (the CSV, each run's output folder, and every
    reply the server received from any node, with what it had asked: :func:`server_view`)."""
    seen: list[dict] = []
    receive = InMemoryGrid.send_and_receive

    def recording(self, messages, timeout=None):
        messages = list(messages)
        asked = {m.metadata.dst_node_id: request_view(m) for m in messages}
        replies = list(receive(self, messages, timeout=timeout))
        seen.extend({**server_view(r), "asked": asked[r.metadata.src_node_id]} for r in replies)
        return replies

    with pytest.MonkeyPatch.context() as mp:  # the ServerApp runs in this process's thread
        mp.setattr(InMemoryGrid, "send_and_receive", recording)
        outs = simulate_together(tmp_path_factory.mktemp("sim4"), session_csv, RUNS4,
                                 ["data.num_clients=4", "engine.num_workers=2"])
    return session_csv, outs, seen


@pytest.fixture(scope="session")
def sim4(sim4_seen):
    """RUNS4 in one simulation of 4 clients: (the CSV, each run's output folder)."""
    return sim4_seen[:2]


def request_view(msg) -> dict:
    """What the server asked a node: the message type, whether it is a SecAgg+ stage, and the
    experiment's config (TOML) when the message carries one."""
    c = msg.content.config_records
    config = c.get(CONFIG_RECORD, c.get("fitins.config", {})).get("config")
    return {"type": msg.metadata.message_type, "secagg_stage": secagg.SECAGG_CONFIGS in c,
            "config": tomllib.loads(config) if isinstance(config, str) else None}


def server_view(reply) -> dict:
    """Everything one reply put in the server's hands, copied before the workflow reads it:
    each record's keys and values (arrays as bytes), by record type."""
    if reply.has_error():
        return {"error": reply.error.reason}
    c = reply.content
    return {"config": {k: dict(v) for k, v in c.config_records.items()},
            "metric": {k: dict(v) for k, v in c.metric_records.items()},
            "array": {k: {n: bytes(a.data) for n, a in v.items()}
                      for k, v in c.array_records.items()}}


@pytest.fixture(scope="session")
def sim3(tmp_path_factory, session_csv):
    """RUNS3 in one simulation of 3 clients: (the CSV, each run's output folder)."""
    return session_csv, simulate_together(tmp_path_factory.mktemp("sim3"), session_csv, RUNS3,
                                         ["data.num_clients=3", "engine.num_workers=2"])


def test_simulation_matches_local_engine(tmp_path, sim4):
    data, outs = sim4
    sets = ["data.num_clients=4", *RUNS4["plain"]]
    local = run(tmp_path / "local", data, sets)
    flower = outs["plain"]
    for f in ("config.toml", "metrics.jsonl", "summary.json", "partition.json",
              "checkpoint.safetensors", "adapter/adapter_model.safetensors"):
        assert (flower / f).is_file(), f
    assert_same_run(read_metrics(local / "metrics.jsonl"), read_metrics(flower / "metrics.jsonl"))
    summary = json.loads((flower / "summary.json").read_text())
    ref = json.loads((local / "summary.json").read_text())
    assert summary["engine"] == "flower-simulation"
    assert summary["total_upload_bytes"] == ref["total_upload_bytes"]
    assert summary["total_download_bytes"] == ref["total_download_bytes"]
    assert summary["total_flower_query_bytes"] > 0
    # where the time went (benchmarks/bench_engines.py reads these): every round's two replies
    # came from the worker processes, the first message of each worker built the experiment
    assert summary["flower_startup_s"] >= 0 and summary["flower_total_s"] == pytest.approx(
        summary["flower_startup_s"] + summary["session_wall_s"] + summary["flower_shutdown_s"])
    assert summary["setup_s"] > 0 and ref["setup_s"] > 0
    rows = read_metrics(flower / "metrics.jsonl")
    for r in rows:
        t = r["flower_timing"]
        assert 1 <= t["workers"] <= 2 and t["client_train_s"] > 0
        assert t["busiest_worker_s"] <= t["send_receive_s"] + 1e-3
        assert t["overhead_s"] == pytest.approx(t["send_receive_s"] - t["busiest_worker_s"],
                                                abs=1e-3)
    assert rows[0]["flower_timing"]["client_build_s"] > 0
    assert all(r["flower_timing"]["client_build_s"] < 0.5 for r in rows[1:])  # cached


def test_a_fleet_with_a_deadline_gives_the_same_clock_on_both_engines(tmp_path, sim4):
    """The simulated clock and its stragglers are the round loop's, from the real encoded bytes:
    Flower's Simulation Engine gives the same times, stragglers and metrics as the local engine
    (on the tiny model the 25 ms deadline leaves two of the four clients behind)."""
    data, outs = sim4
    local = read_metrics(run(tmp_path / "local", data, ["data.num_clients=4", *FLEET])
                         / "metrics.jsonl")
    flower = read_metrics(outs["fleet"] / "metrics.jsonl")
    assert_same_run(local, flower)
    for a, b in zip(local, flower):
        assert a["stragglers"] and b["stragglers"] == a["stragglers"]
        assert b["sim_round_s"] == a["sim_round_s"] and b["sim_time_s"] == a["sim_time_s"]
        assert [c.get("sim_upload_s") for c in b["per_client"]] == \
            [c.get("sim_upload_s") for c in a["per_client"]]


def test_a_node_keeps_each_experiments_client_tensors_apart():
    """One Flower run can serve several experiments (``run_simulations``): a node's stored
    tensors of one experiment are never read by another."""
    import torch
    from flwr.app import RecordDict

    from lora_a2.engines.flower import read_store, write_store

    node = SimpleNamespace(state=RecordDict())
    write_store(node, "seed = 1", {"B": torch.ones(2)})
    write_store(node, "seed = 2", {"B": torch.zeros(3)})
    assert torch.equal(read_store(node, "seed = 1")["B"], torch.ones(2))
    assert torch.equal(read_store(node, "seed = 2")["B"], torch.zeros(3))
    assert read_store(node, "seed = 3") == {}


def test_two_runs_of_one_stateful_config_in_one_simulation_are_refused(tmp_path, synthetic_csv):
    """A node keys each experiment's kept client state by its config: two runs of one config
    (FedSA-LoRA: each client keeps its own B) would share it — refused before Ray starts. The
    same pair of a stateless strategy is not refused by this check."""
    from lora_a2.engines.flower import run_simulations

    def cfg(name):
        return load_config(None, [*TINY, f"data.name=csv:{synthetic_csv}", "engine.name=flower",
                                  f"strategy.name={name}"])

    with pytest.raises(UserError, match=r"share one config in one Flower simulation, and its "
                                        r"clients keep their own B"):
        run_simulations([(cfg("fedsa-lora"), tmp_path / "a"), (cfg("fedsa-lora"), tmp_path / "b")],
                        progress=False)
    assert not (tmp_path / "a").exists()


def _short(u):
    u.values = u.values[:-1]


def _nan(u):
    u.values[0] = float("nan")


def _miscounted(u):
    u.num_examples += 1


@pytest.mark.parametrize("spoil,needle", [(_short, "values"), (_nan, "NaN or Inf"),
                                          (_miscounted, "training examples")])
def test_a_secagg_client_checks_its_own_upload_before_masking(monkeypatch, spoil, needle):
    """Under SecAgg+ the server never sees an upload to check it, so each client runs the
    server's checks on its own before it is turned into the vector to mask: a malformed one (a
    value short), a non-finite one (training diverged: SecAgg+'s clipping lets NaN through) or
    one claiming another example count fails on the node, and nothing reaches the masking."""
    _, s, rt, ctxs = tiny_setup(["strategy.name='fl-lora'"], 2, n=40, max_length=16)
    task = Task.from_payload(s.configure(1, 0, s.init_state(rt.initial_state())).to_payload(
        rt.layout), rt.layout)

    def spoiled_upload(ctx, t):
        good = s.upload(ctx, t)
        spoil(good)
        return good

    exp = SimpleNamespace(strategy=SimpleNamespace(upload=spoiled_upload, validate=s.validate))
    monkeypatch.setattr(clientapp, "task_bytes_of", lambda content: b"task")
    monkeypatch.setattr(clientapp, "_client_task", lambda *a: (exp, task, ctxs[0]))
    masked = []
    monkeypatch.setattr(clientapp, "client_vector", lambda *a: masked.append(a))
    msg = SimpleNamespace(content=SimpleNamespace(
        config_records={"fitins.config": {"config": "seed = 0"}}))
    with pytest.raises(InvalidPayload, match=needle):
        clientapp.client_train(msg, SimpleNamespace())
    assert masked == []


def test_node_discovery_keeps_one_node_per_valid_partition(monkeypatch):
    """The server asks each new node which partition it holds and keeps the first node that
    claims each partition in range: a partition out of range, a num-partitions that is not the
    experiment's, a second claim of a held partition and a failed query are each a warning and
    leave the node out (any registered node can still claim a free partition: node
    authentication, not this check, decides who registers)."""
    from flwr.app import ConfigRecord, Error, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from lora_a2.config import load_config as parse

    for key in ("_task_id", "_run_id", "_node_id"):  # a ServerApp's identity, as Flower sets it
        monkeypatch.setattr(TaskIdentity, key, 1)

    def reply(msg, info):  # what a node's ClientApp answers (real Flower messages)
        if info is None:
            return Message(Error(code=0, reason="boom"), reply_to=msg)
        if info == "no record":
            return Message(RecordDict(), reply_to=msg)
        return Message(RecordDict({CONFIG_RECORD: ConfigRecord(info)}), reply_to=msg)

    # 17–20: malformed answers (no record, no id, a string id, a float count) are warnings too
    answers = {11: {"partition-id": 0}, 12: {"partition-id": 7},
               13: {"partition-id": 1, "num-partitions": 9}, 14: {"partition-id": 0},
               15: None, 16: {"partition-id": 2, "num-partitions": 3}, 17: "no record",
               18: {"num-partitions": 3}, 19: {"partition-id": "1"},
               20: {"partition-id": 1, "num-partitions": 3.0}}

    class Grid:
        def get_node_ids(self):
            return list(answers)

        def send_and_receive(self, messages, timeout=None):
            return [reply(m, answers[m.metadata.dst_node_id]) for m in messages]

    rounds = FlowerRounds(Grid(), parse(None, ["data.num_clients=3", "engine.name=flower"]), 0)
    warnings = rounds.discover(wait=False)
    assert rounds.node_of == {0: 11, 2: 16}
    assert sorted(w.split(":")[0] for w in warnings) == ["node 12", "node 13", "node 14",
                                                         "node 15", "node 17", "node 18",
                                                         "node 19", "node 20"]
    assert sum("malformed answer to the partition query" in w for w in warnings) == 4
    assert "partition-id 7 outside [0, 3)" in " ".join(warnings)
    assert "num-partitions 9 ≠ data.num_clients 3" in " ".join(warnings)
    assert "partition 0 already held by node 11" in " ".join(warnings)
    # a node is asked once, except one whose query failed: it is asked again
    assert rounds.discover(wait=False) == ["node 15: query failed: boom"]
    # node 11 leaves and a new node (a restarted SuperNode, new key) claims its partition 0
    del answers[11]
    answers[21] = {"partition-id": 0}
    again = rounds.discover(wait=False)
    assert "node 11: gone — partition 0 is free again" in again
    assert rounds.node_of == {0: 21, 2: 16} and 11 not in rounds.known


def test_failed_evaluation_answers_are_recorded_not_silently_dropped(monkeypatch):
    """A personalised strategy's evaluate phase over Flower: a node whose ClientApp fails, one
    that does not answer, an answer that cannot be unpacked and one that is not this client's
    each leave that client's evaluation empty and are named in the round's
    ``eval_failures`` (and logged); the good answer is used and counted."""
    from flwr.app import Error, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from lora_a2.engines.flower import message_bytes, pack
    from lora_a2.rounds import eval_reply, evaluate_clients

    for key in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, key, 1)
    cfg, s, rt, _ = tiny_setup(["strategy.name='fedsa-lora'", "engine.name='flower'",
                                "engine.round_timeout_s=30"], 5, n=40, max_length=16)
    state = s.init_state(rt.initial_state())

    def answer(msg):
        c = msg.metadata.dst_node_id - 100
        if c == 1:
            return Message(Error(code=0, reason="boom"), reply_to=msg)
        if c == 3:
            return Message(RecordDict(), reply_to=msg)
        who = 0 if c == 4 else c  # client 4 answers with client 0's metrics
        return Message(pack(encode(eval_reply(who, good))), reply_to=msg)

    good = {"accuracy": 0.5, "macro_f1": 0.4, "loss": 1.1, "local_accuracy": 0.5,
            "local_held_out": 0}  # every metric the classification task's answers carry

    sizes = {"down": 0, "up": 0}  # what Flower serialised, as the fake grid saw it

    class Grid:
        def send_and_receive(self, messages, timeout=None):
            assert timeout == 30.0
            got = [answer(m) for m in messages if m.metadata.dst_node_id != 102]  # 2: silent
            sizes["down"] += sum(message_bytes(m) for m in messages)
            sizes["up"] += sum(message_bytes(r) for r in got)
            return got

    rounds = FlowerRounds(Grid(), cfg, 0)
    rounds.node_of = {c: 100 + c for c in range(5)}
    exp = SimpleNamespace(strategy=s, runtime=rt, cfg=cfg, task=Classification(cfg))
    out = evaluate_clients(exp, 1, state, rounds)
    assert out["client_eval"][0] == good
    assert out["client_eval"][1:] == [None] * 4
    fails = out["eval_failures"]
    assert [f.split(":")[0] for f in fails] == [f"client {c}" for c in (1, 2, 3, 4)], fails
    assert "boom" in fails[0] and "no reply within 30.0 s" in fails[1]
    assert "holds no" in fails[2] and "not an evaluation answer from this client" in fails[3]
    assert out["eval_upload_bytes"] > 0 and out["eval_download_bytes"] > 0
    # Flower's own sizes of the evaluate messages, both ways (payloads + records + config)
    assert rounds.eval_extras() == {"flower_eval_download_bytes": sizes["down"],
                                    "flower_eval_upload_bytes": sizes["up"]}
    assert sizes["down"] > out["eval_download_bytes"] and sizes["up"] > out["eval_upload_bytes"]


def test_the_fault_hook_can_fail_a_clients_evaluation_alone(monkeypatch):
    monkeypatch.setenv(clientapp.FAULT_ENV, "2:1:eval,3:1")
    clientapp._fault(2, 1)  # training in round 2: no fault
    with pytest.raises(RuntimeError, match="evaluate"):
        clientapp._fault(2, 1, evaluate=True)
    clientapp._fault(3, 1, evaluate=True)  # a training fault does not fail the evaluation
    with pytest.raises(RuntimeError, match="client 1 in round 3"):
        clientapp._fault(3, 1)


@pytest.mark.parametrize("timeout_s,passed", [(30.0, 30.0), (0.0, None)])
def test_a_node_that_does_not_answer_in_time_is_a_dropped_client(monkeypatch, timeout_s,
                                                                  passed):
    """``engine.round_timeout_s`` reaches Flower's ``send_and_receive`` (0: wait for every
    reply), and a client whose node sent nothing back by then is a failure "no reply within
    …" while the others' replies are read. (Flower returning without the hung node, for real,
    is ``test_simulation_node_that_times_out_is_dropped``, ``-m slow``.)"""
    from flwr.app import Message
    from flwr.supercore.task_identity import TaskIdentity

    from lora_a2.config import load_config as parse
    from lora_a2.engines.flower import pack

    for key in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, key, 1)
    asked = []

    class Grid:
        def send_and_receive(self, messages, timeout=None):
            asked.append(timeout)  # node 12 (client 1) hangs past the timeout
            return [Message(pack(b"up%d" % m.metadata.dst_node_id), reply_to=m)
                    for m in messages if m.metadata.dst_node_id != 12]

    cfg = parse(None, ["data.num_clients=3", "engine.name=flower",
                       f"engine.round_timeout_s={timeout_s}"])
    rounds = FlowerRounds(Grid(), cfg, 0)
    rounds.node_of = {0: 11, 1: 12, 2: 13}
    rounds._discover_s = 0.0
    rounds._down = rounds._up = 0
    seen = []
    replies = rounds.exchange(None, 1, {0: b"a", 1: b"b", 2: b"c"}, seen.append)
    assert asked == [passed]
    said = "no reply" if passed is None else f"no reply within {passed} s"
    assert replies[1].failure == said and replies[1].blob is None
    assert (replies[0].blob, replies[2].blob) == (b"up11", b"up13")
    assert replies[0].failure is None and seen == [0, 1, 2]


def test_a_node_refuses_a_task_for_another_partition(monkeypatch):
    """A task addressed to client 1 that reaches the node holding partition 0 fails there."""
    _, s, rt, _ = tiny_setup(["strategy.name='fl-lora'"], 2, n=40, max_length=16)
    task = s.configure(1, 1, s.init_state(rt.initial_state()))
    blob = encode(task.to_payload(rt.layout))
    exp = SimpleNamespace(runtime=rt)
    monkeypatch.setattr(clientapp, "_experiment", lambda *a: exp)
    context = SimpleNamespace(node_config={"partition-id": 0})
    with pytest.raises(RuntimeError, match="task for client 1 sent to the node holding "
                                           "partition 0"):
        clientapp._client_task(context, "seed = 0", blob)


def test_round_timing_sums_each_worker_and_leaves_the_rest_to_flower():
    """The split of a round's send_and_receive: per worker (pid) the client seconds add up; the
    critical path is the busiest worker; errors and replies without timings are skipped."""
    from lora_a2.engines.flower import pack, round_timing

    def reply(timing=None, error=False):  # what round_timing reads of a Flower reply
        return SimpleNamespace(has_error=lambda: error, content=pack(b"x", timing=timing))

    def timed(pid, build, train, codec):
        return reply({"pid": pid, "build_s": build, "train_s": train, "codec_s": codec})

    bad = reply({"pid": 7, "build_s": 100.0, "train_s": 0.0, "codec_s": 0.0}, error=True)
    plain = reply()
    garbage = [reply({"pid": 3, "train_s": 5.0}),  # keys missing
               reply({"pid": 3, "build_s": "x", "train_s": 1.0, "codec_s": 0.0}),
               reply({"pid": 3, "build_s": float("nan"), "train_s": 1.0, "codec_s": 0.0})]
    t = round_timing(10.0, [timed(7, 2.0, 3.0, 0.5), timed(7, 0.0, 1.0, 0.5),
                            timed(9, 0.0, 4.0, 0.25), bad, plain, *garbage])
    assert t["workers"] == 2
    assert t["busiest_worker_s"] == pytest.approx(7.0)  # pid 7: 2 + 3 + 0.5 + 1 + 0.5
    assert t["overhead_s"] == pytest.approx(3.0)
    assert t["client_build_s"] == pytest.approx(2.0)
    assert t["client_train_s"] == pytest.approx(8.0)
    assert t["client_codec_s"] == pytest.approx(1.25)


def test_ray_workers_run_at_the_callers_priority_unless_the_environment_says(monkeypatch):
    """Ray renices its workers by +15 by default, which starves the clients' training next to
    any other busy process; the engine asks for 0, and an explicit RAY_worker_niceness wins."""
    from lora_a2.config import load_config
    from lora_a2.engines.flower import backend_config

    cfg = load_config(None, ["engine.name=flower", "engine.num_workers=3", "engine.threads=2"])
    monkeypatch.delenv("RAY_worker_niceness", raising=False)
    b = backend_config(cfg)
    assert b["init_args"]["_system_config"] == {"worker_niceness": 0}
    assert b["init_args"]["num_cpus"] == 6 and b["client_resources"]["num_cpus"] == 2
    monkeypatch.setenv("RAY_worker_niceness", "15")
    assert "_system_config" not in backend_config(cfg)["init_args"]


@pytest.mark.parametrize("case", range(len(DP_CASES)),
                         ids=[f"{s}-privacy{i}" for i, (s, _) in enumerate(DP_CASES)])
def test_simulation_matches_local_for_other_strategies_and_dp(tmp_path, sim3, case):
    """The same hooks (DP clip/noise, central noise, heterogeneous ranks) run on both engines."""
    data, outs = sim3
    privacy = DP_CASES[case][1]
    local = run(tmp_path / "local", data, ["data.num_clients=3", *RUNS3[f"dp{case}"]])
    flower = outs[f"dp{case}"]
    assert_same_run(read_metrics(local / "metrics.jsonl"), read_metrics(flower / "metrics.jsonl"))
    if privacy:
        eps = [r["epsilon"] for r in read_metrics(flower / "metrics.jsonl")]
        assert eps[0] < eps[1]


def test_simulation_node_that_raises_is_dropped(tmp_path, synthetic_csv, monkeypatch):
    # client 1 raises in round 2 (inherited by the Ray workers through the environment)
    monkeypatch.setenv("LORA_A2_FLOWER_FAULT", "2:1")
    out = run(tmp_path / "f", synthetic_csv, ["data.num_clients=3", "train.rounds=2",
                                             "train.min_replies=2", "engine.name=flower",
                                             "engine.num_workers=2"])
    r1, r2 = read_metrics(out / "metrics.jsonl")
    assert r1["dropped"] == [] and r1["num_replies"] == 3
    assert r2["status"] == "ok" and r2["num_replies"] == 2 and r2["dropped"] == [1]
    assert len(r2["failures"]) == 1 and "injected fault" in r2["failures"][0]
    failed = [c for c in r2["per_client"] if c["client"] == 1][0]
    assert failed["dropped"] and failed["upload_bytes"] == 0 and failed["download_bytes"] > 0
    assert json.loads((out / "summary.json").read_text())["dropped_clients"] == 1


@pytest.mark.slow
def test_simulation_node_that_times_out_is_dropped(tmp_path, synthetic_csv, monkeypatch):
    # client 2 sleeps 120 s in round 2; the round proceeds after engine.round_timeout_s
    monkeypatch.setenv("LORA_A2_FLOWER_FAULT", "2:2:hang:120")
    out = run(tmp_path / "t", synthetic_csv, ["data.num_clients=3", "train.rounds=2",
                                             "train.min_replies=2", "engine.name=flower",
                                             "engine.num_workers=3", "engine.round_timeout_s=45"])
    r1, r2 = read_metrics(out / "metrics.jsonl")
    assert r1["num_replies"] == 3
    assert r2["status"] == "ok" and r2["num_replies"] == 2 and r2["dropped"] == [2]
    assert "no reply within" in r2["failures"][0]


@pytest.mark.parametrize("strategy", NEWER)
def test_newer_methods_match_on_both_engines(tmp_path, sim3, strategy):
    """RoLoRA, FedSA-LoRA, FedEx-LoRA and FedSVD give the same metrics and bytes on Flower's
    Simulation Engine as on the local engine. Three rounds: FedSA-LoRA's clients must find their
    own B again on their node (Flower's Context.state) in rounds 2 and 3, and evaluate it there."""
    data, outs = sim3
    local = read_metrics(run(tmp_path / "local", data, ["data.num_clients=3", *RUNS3[strategy]])
                         / "metrics.jsonl")
    flower = read_metrics(outs[strategy] / "metrics.jsonl")
    assert_same_run(local, flower)
    for a, b in zip(local, flower):
        assert b["local_accuracy"] == pytest.approx(a["local_accuracy"], abs=1e-4)
        assert b.get("eval_download_bytes") == a.get("eval_download_bytes")
        assert b.get("eval_upload_bytes") == a.get("eval_upload_bytes")
    if strategy == "fedsa-lora":  # each client evaluated its own B: the clients differ
        assert local[-1]["eval_download_bytes"] > 0
        # Flower's sizes of the evaluate messages are in every round, and in the totals
        for r in flower:
            assert r["flower_eval_download_bytes"] > r["eval_download_bytes"]
            assert r["flower_eval_upload_bytes"] > r["eval_upload_bytes"]
        summary = json.loads((outs[strategy] / "summary.json").read_text())
        for way in ("download", "upload"):
            assert summary[f"total_flower_eval_{way}_bytes"] == sum(
                r[f"flower_eval_{way}_bytes"] for r in flower)
        assert len(set(local[-1]["local_accuracy"])) > 1 or \
            local[-1]["accuracy"] != local[-1]["shared_model_accuracy"]



# ---------------------------------------------------------------------- SecAgg+ (issue 18)
@pytest.mark.parametrize("strategy", SECAGG_STRATEGIES)
def test_secagg_simulation_gives_the_plain_aggregate_up_to_quantisation(tmp_path, sim4, strategy):
    """Flower's SecAgg+ on the Simulation Engine: the server only ever holds the masked sum,
    and the global state after one round equals the plain run's up to the quantisation step
    (2c/Q per entry and client, c = clipping_range, Q = quantization_range).

    One round, because only one aggregate is bounded by the step: a later round trains from a
    state that differs by quantisation, and Adam's normalised steps amplify that (measured:
    6.1e-5 after two FL+LoRA rounds, just over 16 steps; CI failed on it once)."""
    data, outs = sim4
    sets = ["data.num_clients=4", "train.rounds=1", f"strategy.name={strategy}"]
    # the plain aggregate on the local engine (the same as Flower's: the equivalence tests)
    plain = run(tmp_path / "plain", data, sets)
    secure = outs[f"secagg-{strategy}"]
    step = 2 * 8.0 / 4194304
    diff = max_diff(final_state(plain), final_state(secure))
    assert 0 < diff < 4 * 4 * step  # not bit-identical (it was quantised), but within n steps
    rows = read_metrics(secure / "metrics.jsonl")
    for r in rows:
        assert r["status"] == "ok" and r["secagg"]["survivors"] == [0, 1, 2, 3]
        # the defaults (num_shares 1.0, threshold 0.5) as Flower settled them for 4 clients
        assert (r["secagg"]["shares"], r["secagg"]["threshold"]) == (4, 2)
        assert set(r["secagg"]["stages"]) == {"setup", "share_keys", "collect_masked_vectors",
                                              "unmask"}
        assert r["upload_bytes"] == sum(v[1] for v in r["secagg"]["stages"].values())
    plain_rows = read_metrics(plain / "metrics.jsonl")
    # the record has the plain (local) one's fields, Flower's own, and the SecAgg+ block
    # no evaluate phase under SecAgg+ (a personalised strategy is refused there)
    assert set(rows[0]) - set(plain_rows[0]) == (FLOWER_ONLY - FLOWER_EVAL) | {"secagg"}
    # (but LoRA-A2's rank_allocation: the server never sees a client's selection under SecAgg+)
    assert set(plain_rows[0]) - set(rows[0]) <= {"rank_allocation"}
    assert rows[0]["flower_timing"]["secagg_s"] > 0
    # the dense masked upload gives up LoRA-A2's sparsity: it costs more than the plain one
    assert rows[0]["upload_bytes"] > plain_rows[0]["upload_bytes"]
    # the summary's reference figures count the survivors' client-rounds as the plain run's do
    # (each at its public size): a fraction of fedavg-full's upload, not a raw value count
    summary = json.loads((secure / "summary.json").read_text())
    plain_summary = json.loads((plain / "summary.json").read_text())
    assert summary["fl_lora_upload_params"] == plain_summary["fl_lora_upload_params"] > 0
    assert 0 < summary["upload_fraction_of_fedavg_full"] < 1
    assert all(row["num_examples"] > 0 for row in rows[0]["per_client"])


def test_secagg_server_receives_only_keys_shares_and_masked_vectors(sim4_seen):
    """What the server is handed under SecAgg+, reply by reply, from every node, across every
    secure round of the simulation (lora-a2, fl-lora, fl-lora + local DP): the nodes' partition
    ids, then the protocol's own entries and nothing of ours — no plain train or evaluate
    message is ever sent for a SecAgg+ experiment. A masked vector is uniform over [0, modulus_range) — unmasked, the
    quantised values would sit in the bottom [0, Q] = [0, 2^22] of the 2^32 range — and
    the train reply's own records carry no array, the constant SecAgg+ weight 1 instead of the
    example count, and no metrics (Flower's mod passes them on in the clear)."""
    _, outs, seen = sim4_seen
    rounds = sum(len(read_metrics(outs[n] / "metrics.jsonl")) for n in RUNS4 if "secagg" in n)
    protocol = {"setup": {"pk1", "pk2"}, "share_keys": {"dsts", "ctxts"},
                "collect_masked_vectors": {"masked_params"}, "unmask": {"nids", "shares"}}
    by_stage: dict[str, list[dict]] = {}
    for view in seen:
        assert "error" not in view, view
        asked = view["asked"]
        if not asked["secagg_stage"]:
            if asked["type"] == "query":  # which partition a node holds, nothing else
                assert set(view["config"]) == {CONFIG_RECORD} and view["array"] == {}
                assert set(view["config"][CONFIG_RECORD]) <= {"partition-id", "num-partitions"}
            else:  # a plain train or evaluate message: only ever for an experiment without
                assert not asked["config"]["secagg"]["enabled"], asked  # SecAgg+
            continue
        keys = set(view["config"][secagg.SECAGG_CONFIGS])
        stage = next(s for s, k in protocol.items() if k == keys)
        by_stage.setdefault(stage, []).append(view)
    assert {s: len(v) for s, v in by_stage.items()} == {s: 4 * rounds for s in protocol}
    # the recorder saw every reply of the simulation, the plain runs' too
    plain = [v["asked"]["type"] for v in seen if not v["asked"]["secagg_stage"]]
    assert plain.count("query") >= 4 and plain.count("train") >= 4 * 2
    for stage, views in by_stage.items():
        for view in views:
            if stage != "collect_masked_vectors":  # keys and shares alone
                assert set(view["config"]) == {secagg.SECAGG_CONFIGS}, view
                assert view["metric"] == {} and view["array"] == {}
                continue
            assert view["config"]["fitres.metrics"] == {}
            assert view["config"]["fitres.status"] == {"code": 0, "message": ""}
            assert set(view["config"]) == {secagg.SECAGG_CONFIGS, "fitres.metrics",
                                           "fitres.status"}
            assert view["metric"] == {"fitres.num_examples": {"num_examples": 1}}
            assert all(a == {} for a in view["array"].values())  # the raw vector was cleared
            # the masked weight factor, then the masked vector x_k
            v = np.concatenate([bytes_to_ndarray(b).ravel() for b in
                                view["config"][secagg.SECAGG_CONFIGS]["masked_params"]])
            assert v.size > 1000 and v.min() >= 0 and v.max() < 2 ** 32
            # each eighth of the range holds 1/8 of the entries (5 σ of a uniform draw)
            counts = np.bincount(v // 2 ** 29, minlength=8)
            assert np.abs(counts / v.size - 1 / 8).max() < 5 * np.sqrt(7 / 64 / v.size), counts


def test_a_node_lost_during_the_key_exchange_leaves_the_round(monkeypatch):
    """Flower 1.42's unmask stage fails for the neighbours of a node lost during the key
    exchange (they hold no share of it): right after that stage the node leaves the round's
    bookkeeping, and the round goes on while every remaining node keeps `threshold` live
    neighbours — and halts when it does not."""
    monkeypatch.setattr(SecAggPlusWorkflow, "share_keys_stage", lambda self, g, c, s: False)
    wf = secagg._workflow_class()(num_shares=1.0, reconstruction_threshold=0.5, max_weight=1.0,
                                  clipping_range=8.0, quantization_range=1024,
                                  modulus_range=2 ** 32)

    def state(threshold):  # node 3 did not answer the key exchange
        return SimpleNamespace(sampled_node_ids={1, 2, 3, 4}, active_node_ids={1, 2, 4},
                               nid_to_neighbours={n: {1, 2, 3, 4} for n in (1, 2, 3, 4)},
                               num_shares=4, threshold=threshold)

    s = state(2)
    assert wf.share_keys_stage(None, None, s) is True
    assert s.sampled_node_ids == {1, 2, 4} and set(s.nid_to_neighbours) == {1, 2, 4}
    assert all(3 not in nb for nb in s.nid_to_neighbours.values())
    assert wf.settled == {"shares": 4, "threshold": 2}
    assert wf.share_keys_stage(None, None, state(4)) is False  # 3 live neighbours < 4


def test_an_integer_threshold_of_3_halts_a_round_of_two_survivors_before_unmasking(
        monkeypatch):
    """PRIVACY.md's advice against the 32-bit mask seeds: with an integer
    reconstruction_threshold of 3, Flower's check after the masked vectors are collected fails
    when one of three nodes dropped (2 live neighbours, itself included), so the workflow stops
    before its unmask stage; at the default threshold of 2 of 3 it goes on to unmask."""
    for threshold, unmasks in ((3, False), (2, True)):
        wf = SecAggPlusWorkflow(num_shares=1.0, reconstruction_threshold=threshold, max_weight=1.0,
                                clipping_range=8.0, quantization_range=1024,
                                modulus_range=2 ** 32)
        state = SimpleNamespace(sampled_node_ids={1, 2, 3}, active_node_ids={1, 2},
                                nid_to_neighbours={n: {1, 2, 3} for n in (1, 2, 3)},
                                threshold=threshold)
        assert wf._check_threshold(state) is unmasks


def test_the_unmask_stage_records_the_fewest_pairwise_masks_hiding_a_survivor(monkeypatch):
    """Before unmasking, the round's record gets the fewest surviving neighbours (other than
    itself) any survivor has: each is one pairwise mask still hiding its vector once the server
    learns its own-mask seed. A ring of 5 with 3 shares (neighbours: itself and one on each
    side) where nodes 2 and 4 dropped leaves node 3 with none and 1, 5 with one each."""
    monkeypatch.setattr(SecAggPlusWorkflow, "unmask_stage", lambda self, g, c, s: "unmasked")
    wf = secagg._workflow_class()(num_shares=1.0, reconstruction_threshold=0.5, max_weight=1.0,
                                  clipping_range=8.0, quantization_range=1024,
                                  modulus_range=2 ** 32)
    full = {n: {1, 2, 3} for n in (1, 2, 3)}
    for live, want in (({1, 2, 3}, 2), ({1, 2}, 1)):
        s = SimpleNamespace(active_node_ids=live, nid_to_neighbours=full)
        assert wf.unmask_stage(None, None, s) == "unmasked"
        assert wf.settled["fewest_pairwise_masks"] == want
    ring = {n: {(n - 2) % 5 + 1, n, n % 5 + 1} for n in range(1, 6)}
    for live, want in (({1, 3, 5}, 0), ({1, 2, 3, 4, 5}, 2), ({1, 2, 4, 5}, 1)):
        wf.unmask_stage(None, None, SimpleNamespace(active_node_ids=live, nid_to_neighbours=ring))
        assert wf.settled["fewest_pairwise_masks"] == want, live


def test_flowers_byte_totals_are_null_where_a_round_withheld_them():
    """summary.json's Flower totals: the sums over the rounds, or null when the release
    withheld a round's figure (central DP with a data-dependent upload size), as every
    other total."""
    from lora_a2.engines.flower import flower_summary

    fields = flower_summary("flower-simulation")
    full = [{"flower_download_bytes": 5, "flower_upload_bytes": 7, "flower_query_bytes": 1}] * 2
    assert fields(full) == {"engine": "flower-simulation", "total_flower_download_bytes": 10,
                            "total_flower_upload_bytes": 14, "total_flower_query_bytes": 2}
    withheld = [{"flower_download_bytes": 5, "flower_query_bytes": 1}, full[0]]
    got = fields(withheld)
    assert got["total_flower_upload_bytes"] is None
    assert (got["total_flower_download_bytes"], got["total_flower_query_bytes"]) == (10, 2)
    # a personalised strategy's evaluate phase: its own totals, null where a round withheld
    # them; a run without an evaluate phase has none (not a misleading 0)
    ev = [{**full[0], "flower_eval_download_bytes": 3, "flower_eval_upload_bytes": 2}] * 3
    keys = ("total_flower_eval_download_bytes", "total_flower_eval_upload_bytes")
    assert [fields(ev)[k] for k in keys] == [9, 6]
    got = fields([*ev[:2], {**full[0], "flower_eval_download_bytes": 3,
                            "withheld": ["flower_eval_upload_bytes"]}])
    assert [got[k] for k in keys] == [9, None]
    assert "total_flower_eval_download_bytes" not in fields(full)


def test_the_summary_lists_the_secagg_rounds_a_single_mask_hid():
    """summary.json's ``secagg``: rounds the server unmasked, and those where some survivor had
    fewer than three pairwise masks (two fall to a meet-in-the-middle search; failed rounds
    too: the unmasking happened); none without SecAgg+."""
    def rec(rnd, fewest, stages=("setup", "unmask")):
        return {"round": rnd, "status": "ok",
                "secagg": {"stages": dict.fromkeys(stages, [0, 0]),
                           **({} if fewest is None else {"fewest_pairwise_masks": fewest})}}

    assert _secagg_summary([{"round": 1, "status": "ok"}]) == {}
    out = _secagg_summary([rec(1, 2), rec(2, 1), rec(3, 0), rec(4, 3), rec(5, None),
                           rec(6, None, stages=("setup", "share_keys"))])["secagg"]
    assert out["rounds_unmasked"] == 5 and out["weak_rounds"] == [1, 2, 3]
    assert out["unknown_rounds"] == [5]  # a record from before the count was kept
    assert "round(s) 1, 2, 3: a survivor's vector was hidden by fewer than 3" in out["caveat"]
    assert "reconstruction_threshold >= 4" in out["caveat"]
    assert "round(s) 5: how many masks" in out["caveat"]
    fine = _secagg_summary([rec(1, 3), rec(2, 5)])["secagg"]
    assert fine == {"rounds_unmasked": 2, "weak_rounds": []}


def test_secagg_with_local_dp_sums_the_clients_noised_uploads(tmp_path, sim4):
    """SecAgg+ + local DP: each client noises its upload before it is masked, so the unmasked
    sum is the local engine's local-DP aggregate (the same seeded noise) up to quantisation,
    and far from the aggregate without noise."""
    data, outs = sim4
    sets = ["data.num_clients=4", "train.rounds=1", "strategy.name=fl-lora"]
    noised = final_state(run(tmp_path / "dp", data, [*sets, *LOCAL_DP]))
    plain = final_state(outs["secagg-fl-lora"])
    secure = final_state(outs["secagg-dp"])
    step = 2 * 8.0 / 4194304
    assert 0 < max_diff(noised, secure) < 4 * 4 * step  # quantised: it went through SecAgg+
    assert max_diff(plain, secure) > 1000 * step  # the noise is in the sum
    for r in read_metrics(outs["secagg-dp"] / "metrics.jsonl"):
        assert r["secagg"]["survivors"] == [0, 1, 2, 3] and "unmask" in r["secagg"]["stages"]
    summary = json.loads((outs["secagg-dp"] / "summary.json").read_text())
    assert summary["epsilon"] > 0 and summary["privacy"]["mode"] == "local"


def test_secagg_survives_a_client_that_drops_out(tmp_path, synthetic_csv, monkeypatch):
    """Client 2 fails in round 1 after the key exchange: SecAgg+ rebuilds its masks from the
    others' shares and the round aggregates the three survivors — the same state as the plain
    run with the same failure (on the local engine, which equals Flower's), up to
    quantisation."""
    monkeypatch.setenv("LORA_A2_FLOWER_FAULT", "1:2")
    sets = ["data.num_clients=4", "train.rounds=1", "train.min_replies=2"]
    plain = run_local_failing(tmp_path / "plain", synthetic_csv, sets, {(1, 2)})
    secure = run(tmp_path / "secure", synthetic_csv,
                 sets + ["engine.name=flower", "engine.num_workers=2", "secagg.enabled=true"])
    (p,), (s,) = read_metrics(plain / "metrics.jsonl"), read_metrics(secure / "metrics.jsonl")
    assert p["dropped"] == [2] and s["dropped"] == [2]
    assert s["status"] == "ok" and s["secagg"]["survivors"] == [0, 1, 3]
    assert s["secagg"]["fewest_pairwise_masks"] == 2  # three survivors: two masks each
    summary = json.loads((secure / "summary.json").read_text())
    assert summary["secagg"]["weak_rounds"] == [1]  # two masks: a meet-in-the-middle search
    assert max_diff(final_state(plain), final_state(secure)) < 4 * 3 * (2 * 8.0 / 4194304)


@pytest.mark.parametrize("sets,needle", [
    (["secagg.enabled=true"], "engine.name = 'flower'"),
    (["secagg.enabled=true", "engine.name=flower", "secagg.reconstruction_threshold=12"],
     "secagg.reconstruction_threshold"),
    (["secagg.enabled=true", "engine.name=flower", "strategy.name=fedex-lora"],
     "cannot be securely aggregated"),
    (["secagg.enabled=true", "engine.name=flower", "strategy.name=fedsa-lora"],
     "cannot be securely aggregated"),
    (["secagg.enabled=true", "engine.name=flower", "server.max_update_norm=5"],
     "cannot be enforced under secagg.enabled"),
    (["secagg.enabled=true", "engine.name=flower", "privacy.mechanism=gaussian",
      "privacy.epsilon=8", "privacy.mode=central"], "central DP"),
    (["secagg.enabled=true", "engine.name=flower", "secagg.modulus_range=1000"],
     "secagg.modulus_range"),
    (["secagg.enabled=true", "engine.name=flower", "secagg.modulus_range=5000000000"],
     "must be a power of 2"),
    (["secagg.enabled=true", "engine.name=flower", "secagg.num_shares=2"],
     "must be an integer ≥ 3"),
    (["secagg.enabled=true", "engine.name=flower", "secagg.clipping_range=0.5"],
     "'secagg.clipping_range' must be ≥ 1"),
    (["secagg.enabled=true", "engine.name=flower", "secagg.num_shares=3",
      "secagg.reconstruction_threshold=3"], "must be less than secagg.num_shares (3)"),
])
def test_bad_secagg_config_is_one_line_exit_2(capsys, sets, needle):
    assert main(["config", "--set", *sets]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err


def test_a_personalised_strategy_is_refused_under_secagg_whatever_it_declares(monkeypatch,
                                                                             capsys):
    """A personalised strategy (a plugin's, say) that declares secure aggregation would still
    send every client's evaluation in the clear: refused by the config check."""
    monkeypatch.setattr(REGISTRY["fedsa-lora"], "secure_aggregation", True)
    assert main(["config", "--set", "secagg.enabled=true", "engine.name=flower",
                 "strategy.name=fedsa-lora"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is personalised" in err, err


@settings(max_examples=150, deadline=None)
@given(st.one_of(st.integers(1, 8), st.sampled_from([0.1, 0.25, 0.5, 0.75, 1.0])),
       st.one_of(st.integers(1, 8), st.sampled_from([0.1, 0.5, 0.9, 1.0])),
       st.integers(2, 8), st.sampled_from([2 ** 30, 2 ** 32, 3 * 2 ** 30]))
def test_a_secagg_config_we_accept_is_one_flower_accepts(shares, threshold, clients, modulus):
    """Every SecAgg+ setting the config check lets through builds Flower's workflow (its own
    checks run in the constructor) and leaves each client at least 2 and at most all the
    round's clients as share holders; any it refuses is a one-line config error, never a
    traceback in the first round. (The shares Flower settles on in a real round are recorded
    and checked in the simulation tests.)"""
    sets = ["secagg.enabled=true", "engine.name=flower", f"data.num_clients={clients}",
            f"secagg.num_shares={shares}", f"secagg.reconstruction_threshold={threshold}",
            f"secagg.modulus_range={modulus}", "secagg.quantization_range=1024"]
    try:
        load_config(None, sets)
    except UserError:
        return
    a = load_config(None, sets).secagg
    SecAggPlusWorkflow(num_shares=int(a.num_shares) if a.num_shares > 1 else float(a.num_shares),
                       reconstruction_threshold=int(a.reconstruction_threshold)
                       if a.reconstruction_threshold > 1 else float(a.reconstruction_threshold),
                       max_weight=1.0, clipping_range=8.0, quantization_range=1024,
                       modulus_range=modulus)
    assert 2 <= secagg_shares(a.num_shares, clients) <= clients


@pytest.mark.parametrize("args,needle", [(["--busy", "-1"], "--busy must be ≥ 0"),
                                         (["--ray-niceness", "x"], "--ray-niceness")])
def test_bench_engines_rejects_bad_flags_in_one_line(args, needle):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_engines.py"
    r = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert needle in r.stderr.strip().splitlines()[-1]
