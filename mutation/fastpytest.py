"""The test command of every mutation/*.toml: pytest, with torch imported once, not per mutant.

cosmic-ray runs its test command once per mutant; ``python -m pytest`` spends about 2.5 s of the
4-5 s that takes on ``import torch``, so a module's few hundred mutants would take far too long.
``scripts/mutation.sh`` therefore starts a fork server::

    python mutation/fastpytest.py serve SOCKET

which imports the third-party libraries the tests use (torch, numpy, scipy, opacus, safetensors,
hypothesis, pytest) -- and *no* ``lora_a2`` module -- then waits. The test command::

    python mutation/fastpytest.py PYTEST_ARGS...

sends its arguments, working directory, environment and its own stdout/stderr to the server
(``$MUTATION_PYTEST_SOCKET``); the server forks a child that runs ``pytest.main(PYTEST_ARGS)``
in that directory, so the child imports the (mutated) ``lora_a2`` source afresh, and the
client exits with the child's exit status. When the client dies (cosmic-ray's per-mutant
timeout kills it), the server kills the child. Without a reachable server the client runs
pytest itself, in-process: the same result, only slower.

Both routes run Hypothesis with ``derandomize=True`` and no example database, so a mutant's
outcome does not depend on the mutants tested before it or on the clock.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import struct
import sys
import traceback

HARD_CAP_S = 600  # a child never outlives this, whatever happens to its client
# A mutant that turns a size into a huge one must fail its tests, not swap out the machine.
MEMORY_CAP_BYTES = int(float(os.environ.get("MUTATION_MEMORY_CAP_GB", "4")) * 1024**3)
_CHILD: list[int] = []  # the test run in progress, killed if the server is told to stop
_HEADER = struct.Struct("!Q")
_RC = struct.Struct("!i")


def _preload() -> None:
    """Import what the tests import, except lora_a2 (the child must read the mutated source)."""
    import hypothesis  # noqa: F401
    import numpy  # noqa: F401
    import opacus.accountants  # noqa: F401  (5 s to import; the privacy tests use its RDP code)
    import opacus.accountants.analysis.rdp  # noqa: F401
    import opacus.accountants.utils  # noqa: F401
    import pytest  # noqa: F401
    import safetensors.torch  # noqa: F401
    import scipy.linalg  # noqa: F401
    import torch

    torch.set_num_threads(1)
    assert not any(m == "lora_a2" or m.startswith("lora_a2.") for m in sys.modules), \
        "the fork server must not import lora_a2"


def _run_pytest(args: list[str]) -> int:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP_BYTES, MEMORY_CAP_BYTES))
    from hypothesis import settings

    settings.register_profile("mutation", derandomize=True, database=None)
    settings.load_profile("mutation")
    import pytest

    # The preloaded hypothesis plugin cannot be assert-rewritten; that is expected here.
    return int(pytest.main(["-W", "ignore::pytest.PytestAssertRewriteWarning", *args]))


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("client went away")
        buf += chunk
    return buf


def _handle(listener: socket.socket, conn: socket.socket) -> None:
    first, fds, _, _ = socket.recv_fds(conn, 65536, 2)
    try:
        if len(fds) != 2 or len(first) < _HEADER.size:
            raise ConnectionError("malformed request")
        (length,) = _HEADER.unpack(first[:_HEADER.size])
        body = first[_HEADER.size:]
        body += _recv_exact(conn, length - len(body))
        req = json.loads(body)
        pid = os.fork()
        if pid == 0:  # child: become the test run the client asked for
            rc = 3
            try:
                listener.close()
                conn.close()
                os.dup2(fds[0], 1)
                os.dup2(fds[1], 2)
                os.chdir(req["cwd"])
                os.environ.clear()
                os.environ.update(req["env"])
                sys.path.insert(0, req["cwd"])  # as `python -m pytest` does
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.default_int_handler)
                signal.signal(signal.SIGALRM, signal.SIG_DFL)
                signal.alarm(HARD_CAP_S)
                rc = _run_pytest(req["args"])
            except BaseException:  # noqa: BLE001  (report anything, exit non-zero)
                traceback.print_exc()
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(rc)
    finally:
        for fd in fds:
            os.close(fd)
    _CHILD.append(pid)
    try:
        _wait(conn, pid)
    finally:
        _CHILD.remove(pid)


def _wait(conn: socket.socket, pid: int) -> None:
    status = None
    while status is None:
        readable, _, _ = select.select([conn], [], [], 0.02)
        done, st = os.waitpid(pid, os.WNOHANG)
        if done:
            status = st
        elif readable and not conn.recv(1):  # the client is gone: so goes its test run
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return
    try:
        conn.sendall(_RC.pack(os.waitstatus_to_exitcode(status)))
    except OSError:
        pass


def _stop(signum: int, _frame) -> None:
    for pid in _CHILD:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except OSError:
            pass
    sys.exit(128 + signum)


def serve(path: str) -> None:
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    _preload()
    sys.dont_write_bytecode = True
    if os.path.exists(path):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4)
    print(f"fastpytest: serving on {path}", flush=True)
    while True:  # one test run at a time: mutation testing here uses a single worker
        conn, _ = listener.accept()
        with conn:
            try:
                _handle(listener, conn)
            except (ConnectionError, OSError, ValueError) as e:
                print(f"fastpytest: dropped a request ({e})", file=sys.stderr, flush=True)


def client(args: list[str]) -> int:
    path = os.environ.get("MUTATION_PYTEST_SOCKET")
    if path:
        try:
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.connect(path)
        except OSError:
            conn = None  # no server: run pytest here
        if conn is not None:
            with conn:
                body = json.dumps({"args": args, "cwd": os.getcwd(), "env": dict(os.environ)})
                data = body.encode()
                socket.send_fds(conn, [_HEADER.pack(len(data)) + data], [1, 2])
                try:
                    (rc,) = _RC.unpack(_recv_exact(conn, _RC.size))
                except ConnectionError:
                    print("fastpytest: the server dropped the run", file=sys.stderr)
                    return 3
                return rc
    sys.dont_write_bytecode = True
    sys.path[0] = os.getcwd()  # as `python -m pytest` does (not this script's folder)
    return _run_pytest(args)


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serve(sys.argv[2])
    else:
        sys.exit(client(sys.argv[1:]))
