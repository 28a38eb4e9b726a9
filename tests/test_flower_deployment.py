"""The Flower Deployment Engine against real SuperLink/SuperNode processes on 127.0.0.1 (every
process stopped by pid): plain, with TLS and SuperNode authentication, and with SecAgg+."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from lora_a2.engines.flower.serverapp import run_config_flag  # noqa: E402
from lora_a2.errors import UserError  # noqa: E402
from lora_a2.report import read_metrics  # noqa: E402

from flower_util import (BIN, ROOT, TINY, assert_same_run, final_state,  # noqa: E402
                         max_diff, run, run_local_failing)


# SuperLink and SuperNode processes (no Ray): one deployment at a time, on one xdist worker,
# beside the worker that runs the Ray simulations
pytestmark = pytest.mark.xdist_group("deployment")


_GIVEN: set[int] = set()
_PICK = random.Random()


def free_port() -> int:
    """A free loopback port below the kernel's ephemeral range (32768 and up on Linux, where
    Ray's and gRPC's outgoing connections take theirs), never one this module handed out
    before: two SuperNodes on one Runtime API port leave one of them dead."""
    while True:
        port = _PICK.randrange(20000, 32768)
        if port in _GIVEN:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _GIVEN.add(port)
        return port


def stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM each process we started (by pid), then SIGKILL what did not exit. The
    superexec/serverapp/clientapp helpers Flower spawns watch their parent's pid and exit."""
    for p in reversed(procs):
        if p.poll() is None:
            os.kill(p.pid, signal.SIGTERM)
    for p in reversed(procs):
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.kill(p.pid, signal.SIGKILL)
            p.wait(timeout=5)


def make_credentials(d: Path, nodes: int) -> None:
    """A throw-away CA, a server certificate for 127.0.0.1 signed by it, and one P-384 key pair
    per SuperNode (OpenSSH format, as ``ssh-keygen -t ecdsa -b 384`` writes them)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    d.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    span = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1))

    def cert(subject: str, key, issuer: x509.Name, signer, ca: bool) -> x509.Certificate:
        b = (x509.CertificateBuilder()
             .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
             .issuer_name(issuer).public_key(key.public_key())
             .serial_number(x509.random_serial_number())
             .not_valid_before(span[0]).not_valid_after(span[1]))
        if ca:
            b = b.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        else:
            b = b.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
        return b.sign(signer, hashes.SHA256())

    pem, none = serialization.Encoding.PEM, serialization.NoEncryption()
    ca_key, key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lora-a2 test CA")])
    ca = cert("lora-a2 test CA", ca_key, ca_name, ca_key, ca=True)
    (d / "ca.crt").write_bytes(ca.public_bytes(pem))
    (d / "server.pem").write_bytes(cert("127.0.0.1", key, ca_name, ca_key, ca=False).public_bytes(pem))
    (d / "server.key").write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, none))
    for k in range(nodes):
        nk = ec.generate_private_key(ec.SECP384R1())
        (d / f"node{k}.key").write_bytes(
            nk.private_bytes(pem, serialization.PrivateFormat.OpenSSH, none))
        (d / f"node{k}.pub").write_bytes(nk.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))


class PortTaken(RuntimeError):
    """A process of the federation could not bind the port ``free_port`` gave it."""


def start_federation(tmp_path: Path, secure: bool, nodes: int = 2,
                     extra_env: dict[str, str] | None = None):
    """A SuperLink and two SuperNodes (partitions 0 and 1) on 127.0.0.1. ``secure=False``:
    ``--insecure`` (loopback only). ``secure=True``: docs/ENGINES.md's production setup — TLS with a
    CA certificate and SuperNode authentication, each node's public key registered with
    ``flwr supernode register`` before the node starts. Yields (env, tmp_path, port, creds).

    A port can be taken between ``free_port`` and the bind (the Ray simulations on the other
    xdist worker open ports all the time); the whole federation then starts again on new ports,
    at most three times in all."""
    creds = tmp_path / "creds"
    if secure:
        make_credentials(creds, nodes=nodes + 1)  # the last key is never registered
    for attempt in range(3):
        procs: list[subprocess.Popen] = []
        logs: list = []
        up = False
        try:
            env, port = launch(tmp_path, secure, nodes, extra_env, creds, procs, logs)
            up = True
        except PortTaken:
            if attempt == 2:
                raise
        finally:
            if not up:
                stop(procs)
                for log in logs:
                    log.close()
        if up:
            break
    try:
        yield env, tmp_path, port, creds
    finally:
        stop(procs)
        for log in logs:
            log.close()
    assert all(p.poll() is not None for p in procs)


def launch(tmp_path: Path, secure: bool, nodes: int, extra_env: dict[str, str] | None,
           creds: Path, procs: list[subprocess.Popen], logs: list) -> tuple[dict, int]:
    """Start the SuperLink and ``nodes`` SuperNodes (appending to ``procs`` and ``logs``) and wait
    until every node is activated; the processes' environment and the SuperLink's port."""
    home = tmp_path / "flwr-home"
    home.mkdir(exist_ok=True)
    port = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = "127.0.0.1:{port}"\n'
        + (f'root-certificates = "{creds / "ca.crt"}"\n' if secure else "insecure = true\n"))
    env = {**os.environ, "FLWR_HOME": str(home), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(extra_env or {})}

    def start(name: str, cmd: list[str]) -> None:
        log = open(tmp_path / f"{name}.log", "w")
        logs.append(log)
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))

    link = ["--insecure"] if not secure else [
        "--ssl-ca-certfile", str(creds / "ca.crt"), "--ssl-certfile", str(creds / "server.pem"),
        "--ssl-keyfile", str(creds / "server.key"), "--enable-supernode-auth"]
    start("superlink", [str(BIN / "flower-superlink"), *link, "--port", str(port),
                        "--disable-runtime-dependency-installation"])
    if secure:
        wait_for_nodes(tmp_path, port, 0, procs)
        for k in range(nodes):
            r = subprocess.run([str(BIN / "flwr"), "supernode", "register",
                                str(creds / f"node{k}.pub"), "test"], env=env,
                               capture_output=True, text=True, timeout=120)
            assert "registered successfully" in r.stdout, r.stdout + r.stderr
    for k in range(nodes):
        node = ["--insecure"] if not secure else [
            "--root-certificates", str(creds / "ca.crt"),
            "--auth-supernode-private-key", str(creds / f"node{k}.key")]
        start(f"supernode{k}", [str(BIN / "flower-supernode"), *node, "--superlink",
                                f"127.0.0.1:{port}", "--port", str(free_port()),
                                "--node-config", f"partition-id={k} num-partitions={nodes}"])
    wait_for_nodes(tmp_path, port, nodes, procs)
    return env, port


@pytest.fixture
def secure_federation(tmp_path):
    yield from start_federation(tmp_path, secure=True)


def log_tails(tmp: Path, chars: int = 1500) -> str:
    """The end of every process log in ``tmp``: what a failed start-up leaves to read."""
    return "".join(f"\n--- {log.name} ---\n{log.read_text(errors='replace')[-chars:]}"
                   for log in sorted(tmp.glob("*.log")))


def wait_for_nodes(tmp: Path, port: int, nodes: int, procs: list[subprocess.Popen],
                   timeout: float = 240.0) -> None:
    """Block until the SuperLink accepts connections and ``nodes`` SuperNodes activated: a
    ``flwr run`` issued earlier fails with "Connection to the SuperLink is unavailable". Four
    Python processes importing flwr beside another xdist worker can take minutes on 2 cores, so
    the wait is long; a process that exits meanwhile ends it at once: ``PortTaken`` when its log
    says its port was in use, else an error with every log's tail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                why = f"{Path(proc.args[0]).name} exited (code {proc.returncode}) while the " \
                      "federation started" + log_tails(tmp)
                # (uvicorn: "address already in use"; Flower's gRPC check: "… is already in use")
                raise PortTaken(why) if "already in use" in why.lower() else RuntimeError(why)
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                pass
            log = (tmp / "superlink.log").read_text(errors="replace")
            # (the socket alone is not enough: whatever took the port may be listening on it)
            if "Uvicorn running on" in log and log.count("Activated node_id") >= nodes:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"SuperLink on port {port} / {nodes} SuperNodes not up in {timeout} s"
                       + log_tails(tmp))


def done(out: Path) -> bool:
    """The ServerApp re-writes summary.json with the engine's totals as its very last step."""
    try:
        return "engine" in json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        return False


def test_deployment_engine_with_tls_and_supernode_auth(secure_federation, synthetic_csv):
    """docs/ENGINES.md's production commands: TLS + registered SuperNodes run the same experiment as
    the local engine, and a SuperNode whose key was never registered is refused. (The SecAgg+
    test below runs on this setup too, with three nodes; the insecure loopback commands are
    only started, in the test after it: a ``flwr run`` costs ≈ 60 s on 2 cores.)"""
    env, tmp, port, creds = secure_federation
    deploy_and_compare(env, tmp, synthetic_csv)
    code, said = lone_node(env, tmp, "rogue", port, "--root-certificates", str(creds / "ca.crt"),
                           "--auth-supernode-private-key", str(creds / "node2.key"))
    assert code != 0 and "Failed to activate SuperNode" in said, said[-2000:]
    activated = (tmp / "superlink.log").read_text().count("Activated node_id")
    # a registered key without TLS: node authentication needs TLS, so Flower refuses to start
    # before it ever reaches the SuperLink: the process exits 1 and logs Flower's code 303
    code, said = lone_node(env, tmp, "keyed-plaintext", port, "--insecure",
                           "--auth-supernode-private-key", str(creds / "node0.key"))
    assert code == 1 and "Exit Code: 303" in said, said[-2000:]
    # a plaintext node with no key against the TLS SuperLink never activates
    code, said = lone_node(env, tmp, "plaintext", port, "--insecure")
    assert code != 0 and "could not establish a connection" in said, said[-2000:]
    assert (tmp / "superlink.log").read_text().count("Activated node_id") == activated


def lone_node(env: dict, tmp: Path, name: str, port: int, *flags: str) -> tuple[int, str]:
    """Start one more SuperNode with ``flags`` (one connection attempt) against the SuperLink
    on ``port`` and wait for it to exit: its exit code and its log (``tmp/NAME.log``: a file,
    not a pipe, since the node's helper process may hold a pipe open after it exits)."""
    with open(tmp / f"{name}.log", "w") as log:
        node = subprocess.Popen(
            [str(BIN / "flower-supernode"), *flags, "--superlink", f"127.0.0.1:{port}",
             "--port", str(free_port()), "--max-retries", "1",
             "--node-config", "partition-id=0 num-partitions=2"],
            env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            node.wait(timeout=120)
        finally:
            stop([node])
    return node.returncode, (tmp / f"{name}.log").read_text()


def deploy_and_compare(env: dict, tmp: Path, synthetic_csv: Path) -> None:
    """``flwr run`` a 2-client, 1-round experiment on the running federation; it must match the
    same experiment on the local engine."""
    sets = ["data.num_clients=2", "train.rounds=1"]
    local = run(tmp / "local", synthetic_csv, sets)
    out = deploy(env, tmp, synthetic_csv, sets)
    flower = read_metrics(out / "metrics.jsonl")
    assert_same_run(read_metrics(local / "metrics.jsonl"), flower)
    assert flower[0]["failures"] == [] and flower[0]["flower_query_bytes"] > 0
    for f in ("checkpoint.safetensors", "adapter/adapter_model.safetensors", "partition.json"):
        assert (out / f).is_file(), f


def deploy(env: dict, tmp: Path, synthetic_csv: Path, sets: list[str]) -> Path:
    """``flwr run`` the experiment ``sets`` on the running federation; its output folder."""
    out = tmp / "deployed"
    overrides = ";".join(TINY + sets + [f"data.name=csv:{synthetic_csv}"])
    cmd = [str(BIN / "flwr"), "run", str(ROOT / "flower_app"), "test", "--stream",
           "--run-config", f'set="{overrides}" out="{out}" overwrite=true']
    for attempt in range(3):  # a loaded machine can refuse the very first control connection
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        try:
            deadline = time.monotonic() + 240
            while not done(out) and time.monotonic() < deadline:
                if proc.poll() is not None and proc.returncode != 0:
                    break
                time.sleep(1)
        finally:
            stop([proc])
        if done(out) or proc.returncode in (0, None):
            break
        first = proc.stdout.read() if proc.stdout else ""
        if "unavailable" not in first:
            break
        time.sleep(2)
    logs = "".join((tmp / f"{n}.log").read_text()[-3000:] for n in ("superlink", "supernode0"))
    assert done(out), (proc.stdout.read() if proc.stdout else "") + logs
    assert json.loads((out / "summary.json").read_text())["engine"] == "flower-deployment"
    return out



def test_the_insecure_loopback_federation_starts(tmp_path):
    """ENGINES.md's loopback commands (``--insecure`` on both sides): the SuperLink serves and
    both SuperNodes activate, without TLS and without any key registered."""
    federation = start_federation(tmp_path, secure=False)
    try:
        env, tmp, port, creds = next(federation)
        assert not creds.exists()
        log = (tmp / "superlink.log").read_text()
        assert "insecure" in log.lower() and log.count("Activated node_id") == 2
    finally:
        federation.close()  # stops every process, whatever failed above


@pytest.fixture
def federation3_with_a_failing_node(tmp_path):
    yield from start_federation(tmp_path, secure=True, nodes=3,
                                extra_env={"LORA_A2_FLOWER_FAULT": "1:2"})


def test_secagg_on_the_deployment_engine_with_a_node_dropping_out(
        federation3_with_a_failing_node, synthetic_csv):
    """SecAgg+ through real SuperLink/SuperNode processes, on TLS with SuperNode authentication
    (the production setup: each SecAgg+ stage a separate ClientApp process; the protocol state
    lives in the node's Context): client 2 fails after
    the key exchange, the round sums the other two, and the state equals the plain Simulation
    Engine run with the same failure (on the local engine, which equals Flower's) up to
    quantisation."""
    env, tmp, _, _ = federation3_with_a_failing_node
    sets = ["data.num_clients=3", "train.rounds=1", "train.min_replies=2"]
    out = deploy(env, tmp, synthetic_csv, sets + ["secagg.enabled=true"])
    (r,) = read_metrics(out / "metrics.jsonl")
    assert r["status"] == "ok" and r["secagg"]["survivors"] == [0, 1] and r["dropped"] == [2]
    # two survivors: each hidden by one 32-bit pairwise mask once unmasked, and summary.json
    # says so (PRIVACY.md)
    assert r["secagg"]["fewest_pairwise_masks"] == 1
    assert json.loads((out / "summary.json").read_text())["secagg"]["weak_rounds"] == [1]
    assert r["flower_query_bytes"] > 0 and len(r["failures"]) == 1
    for f in ("checkpoint.safetensors", "adapter/adapter_model.safetensors", "partition.json"):
        assert (out / f).is_file(), f
    plain = run_local_failing(tmp / "plain", synthetic_csv, sets, {(1, 2)})
    assert max_diff(final_state(plain), final_state(out)) < 4 * 2 * (2 * 8.0 / 4194304)


@pytest.mark.parametrize("value,expected", [(True, True), (False, False), ("false", False),
                                            (" True ", True), (None, "must be true or false"),
                                            ("no", "must be true or false"),
                                            (1, "must be true or false")])
def test_the_overwrite_run_config_flag_reads_a_quoted_false_as_false(value, expected):
    """``--run-config 'overwrite="false"'`` arrives as a string: it must not delete the run."""
    if isinstance(expected, bool):
        assert run_config_flag({"overwrite": value}, "overwrite") is expected
    else:
        with pytest.raises(UserError, match=expected):
            run_config_flag({"overwrite": value}, "overwrite")
    assert run_config_flag({}, "overwrite") is False


@pytest.mark.parametrize("rc,expected", [
    ({}, (False, False)),
    ({"resume": True}, (False, True)),
    ({"resume": "true", "overwrite": "false"}, (False, True)),
    ({"overwrite": True}, (True, False)),
    ({"resume": True, "overwrite": True}, "cannot both be true"),
    ({"resume": "yes"}, "run config 'resume' must be true or false"),
])
def test_the_deployment_server_app_passes_resume_and_overwrite(monkeypatch, tmp_path, rc,
                                                                expected):
    """``flwr run … --run-config 'resume=true'`` continues the run in ``out`` (the runner then
    applies every resume check, the Flower client-state refusal included); resume and
    overwrite together are refused."""
    from types import SimpleNamespace

    from lora_a2.engines.flower import serverapp

    seen = {}
    monkeypatch.setattr(serverapp, "FlowerRounds", lambda grid, cfg: "rounds")
    monkeypatch.setattr(serverapp, "run_experiment",
                        lambda cfg, out, **kw: seen.update(out=out, **kw) or {})
    context = SimpleNamespace(run_config={"out": str(tmp_path / "r"), **rc})
    if isinstance(expected, str):
        with pytest.raises(UserError, match=expected):
            serverapp.deployment_main(None, context)
        assert seen == {}
        return
    serverapp.deployment_main(None, context)
    assert (seen["overwrite"], seen["resume"]) == expected
    assert seen["inputs"] == []  # no config file: nothing else the run reads
    (tmp_path / "my.toml").write_text("seed = 3\n")  # a config file is an input --overwrite
    context.run_config["config"] = str(tmp_path / "my.toml")  # must not delete
    serverapp.deployment_main(None, context)
    assert seen["inputs"] == [tmp_path / "my.toml"]
    assert seen["out"] == tmp_path / "r" and seen["round_fn"] == "rounds"
    assert seen["engine_summary"]([])["engine"] == "flower-deployment"
