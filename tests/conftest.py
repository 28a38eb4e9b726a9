"""Shared fixtures: a tiny random BERT built in code and a small synthetic text task."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # two test workers on 2 cores: one thread each, for torch here and every process a test
    # starts (two processes at two threads each run several times slower)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(min(2, torch.get_num_threads()))

def pytest_configure(config):
    """``--dist loadgroup`` keeps the Ray and Deployment tests one at a time only where
    pytest-xdist can group: its 3.8 renames items through a field pytest 9.2 no longer reads
    (pytest-xdist#1386), and every test then runs anywhere, silently. Stop with the reason."""
    from importlib.metadata import version

    from packaging.version import Version

    if config.getoption("dist", "no") == "loadgroup" and \
            Version(pytest.__version__) >= Version("9.2.0.dev0") and \
            Version(version("pytest-xdist")) <= Version("3.8.0"):
        raise pytest.UsageError(
            f"pytest {pytest.__version__} with pytest-xdist {version('pytest-xdist')} does not "
            "group tests under --dist loadgroup (pytest-xdist#1386): install the test extra "
            "(pytest<9.2), or run with -n 0")


#: the tiny run every end-to-end test starts from (a random BERT, 4 clients, 3 rounds); a test
#: adds its own ``--set`` items after these (a later item wins)
TINY = ["model.name=tiny-random-bert", "data.num_clients=4", "train.rounds=3",
        "model.head=trained", "strategy.global_rank=4", "strategy.rank_budget=2",
        "model.max_length=24", "data.partition=dirichlet", "data.alpha=0.5", "engine.threads=1"]

WORDS = [["apple", "banana", "cherry", "grape"], ["dog", "cat", "mouse", "horse"],
         ["red", "blue", "green", "yellow"]]


def synthetic_texts(n: int, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """Three trivially separable classes of short texts."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    texts = [" ".join(rng.choice(WORDS[label], 5)) for label in labels]
    return texts, labels


def write_synthetic_csv(path):
    """Write the toy CSV (text/label columns, labels as strings, 240 rows) to ``path``."""
    texts, labels = synthetic_texts(240)
    names = np.array(["fruit", "animal", "colour"])
    with open(path, "w") as f:
        f.write("text,label\n")
        for t, y in zip(texts, labels):
            f.write(f"{t},{names[y]}\n")
    return path


@pytest.fixture
def synthetic_csv(tmp_path):
    """A CSV file with text/label columns (labels as strings) for end-to-end runs."""
    return write_synthetic_csv(tmp_path / "toy.csv")


@pytest.fixture(scope="session")
def session_csv(tmp_path_factory):
    """The same toy CSV, once per test process (for runs a session-scoped fixture shares)."""
    return write_synthetic_csv(tmp_path_factory.mktemp("data") / "toy.csv")


def tiny_setup(sets: list[str], clients: int, n: int = 90, max_length: int = 24,
               unequal: bool = False):
    """(cfg, strategy, runtime, client contexts) on the tiny random BERT and synthetic texts,
    the clients holding equal contiguous shares of ``n`` examples — or, ``unequal``, shares
    growing as 1 : 3 : 5 : … (90 examples, 3 clients: 10, 30, 50), so that a test of an
    aggregation rule fails when the data weights are wrong (equal shares hide it)."""
    from lora_a2.adapter import ModelRuntime
    from lora_a2.tasks.classification import Classification, encode_texts
    from lora_a2.config import load_config
    from lora_a2.private import build_strategy
    from lora_a2.strategies import ClientContext

    cfg = load_config(None, ["model.name='tiny-random-bert'", "strategy.global_rank=4",
                             f"data.num_clients={clients}", *sets])
    s = build_strategy(cfg)  # the DP wrapper around the strategy when privacy is on
    rt = ModelRuntime(cfg.model, 3, s.lora_rank(), cfg.seed, torch.device("cpu"),
                      task=Classification(cfg))
    s.bind(rt.layout)
    texts, labels = synthetic_texts(n)
    enc = encode_texts(rt.tokenizer, texts, labels, max_length)
    if unequal:
        cuts = np.cumsum([2 * k + 1 for k in range(clients)])
        cuts = np.round(cuts / cuts[-1] * n).astype(int)
        parts = np.split(np.arange(n), cuts[:-1])
    else:
        parts = np.array_split(np.arange(n), clients)
    s.bind_clients([len(p) for p in parts])
    return cfg, s, rt, [ClientContext(rt, enc, parts[c], cfg) for c in range(clients)]


def assert_config_error(capsys, sets: list[str], needle: str) -> None:
    """``lora-a2 config --set …`` exits 2 with one stderr line that contains ``needle``."""
    from lora_a2.cli import main

    assert main(["config", "--set", *sets]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err


def run_cli(out, *sets: str, data=None, base: list[str] | None = None, code: int = 0,
            args: tuple[str, ...] = ()):
    """``lora-a2 run --quiet --out OUT [--set data.name=DATA] --set ITEM …`` in this
    process, with the items of ``base`` (default :data:`TINY`) before ``sets``; asserts the
    exit code and returns ``out``. When ``sets`` choose a partition other than Dirichlet, the
    base's ``data.alpha`` is left out (set for another partition it is refused)."""
    from lora_a2.cli import main

    base = TINY if base is None else base
    if any(s.startswith("data.partition=") and "dirichlet" not in s for s in sets):
        base = [b for b in base if not b.startswith("data.alpha=")]
    argv = ["run", "--quiet", "--out", str(out), *args]
    if data is not None:  # a path is a CSV file; a string is a data.name as written
        argv += ["--set", f"data.name={data}" if isinstance(data, str) else f"data.name=csv:{data}"]
    for item in [*base, *sets]:
        argv += ["--set", item]
    assert main(argv) == code
    return out


def stop_before_round(stop: int):
    """A local-engine round function that raises KeyboardInterrupt when round ``stop`` starts:
    the run stops as if killed after round ``stop - 1`` was checkpointed."""
    from lora_a2.engines.local import run_round

    def round_fn(exp, rnd, state, on_client=None):
        if rnd == stop:
            raise KeyboardInterrupt
        return run_round(exp, rnd, state, on_client)
    return round_fn
