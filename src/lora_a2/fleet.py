"""Devices and networks of a simulated fleet, and the simulated clock of a round. Pure: no I/O
besides reading a fleet CSV; no engine in it, so every transport runs the same arithmetic.

A client's simulated round time (docs/FLEETS.md):

    t_k = 8 · download_bytes_k / (down_mbps_k · 10⁶)                        (download)
        + n_k · passes_k · flops_per_example / flops_k                         (compute)
        + 8 · upload_bytes_k / (up_mbps_k · 10⁶)                             (upload)

with the real encoded sizes of the client's task and upload, n_k its training examples, passes_k
what its strategy's task costs in passes over them (:meth:`Strategy.local_passes`) and
``flops_per_example`` the FLOPs of one training step (forward + backward) per example, counted
once per model with torch's FLOP counter, fused attention included (the same on every device)
(:func:`training_flops_per_example`). A round with a deadline keeps the clients with t_k ≤
deadline; over-selection keeps the first ``clients_per_round`` to finish (Bonawitz et al.,
"Towards Federated Learning at Scale: System Design", MLSys 2019) — :func:`close_round_clock`.

Built-in fleets (``fleet.profile``) draw each client's device and link, seeded, from published
measurements (:data:`COMPUTE`, :data:`LINKS`, :data:`PROFILES`; sources and dates in
docs/FLEETS.md); ``csv:PATH`` gives one row per client.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import Config, clients_known
from .errors import UserError
from .flops import flop_counter

_DRAW_SALT = 0xF1EE7
_ONLINE_SALT = 0x0A7A11AB


# ---------------------------------------------------------------------- published figures
@dataclass(frozen=True)
class ComputeClass:
    """A device class's sustained training throughput, drawn uniformly in [low, high] FLOP/s."""

    low: float
    high: float
    source: str


@dataclass(frozen=True)
class LinkClass:
    """A network's median (or mean, where the source gives only that) speeds in Mbit/s."""

    down_mbps: float
    up_mbps: float
    source: str


#: device classes (docs/FLEETS.md § Sources)
COMPUTE: dict[str, ComputeClass] = {
    # Das, Kwon, Chauhan, Mascolo, "Enabling On-Device Smartphone GPU based Training: Lessons
    # Learned", arXiv:2202.10100 (Feb 2022): training kernels on Snapdragon 8-series phones
    "phone-cpu": ComputeClass(15e9, 30e9, "Das et al. 2022, CPU (MNN), 15-30 GFLOP/s"),
    "phone-gpu": ComputeClass(40e9, 70e9, "Das et al. 2022, optimised OpenCL GPU, 40-70 GFLOP/s"),
    "phone-gpu-low": ComputeClass(40e9, 40e9, "Das et al. 2022, GPU, lower end: 40 GFLOP/s"),
    # B. Wasti, tuned WebGPU matrix multiply on an M1 MacBook Air (reported Mar 2021): a GEMM
    # peak, so an upper figure for a laptop's sustained training throughput
    "laptop": ComputeClass(900e9, 900e9, "Wasti 2021, M1 MacBook Air GEMM, 900 GFLOP/s"),
}

#: networks (Ookla Speedtest Global Index and Speedtest Intelligence reports)
LINKS: dict[str, LinkClass] = {
    "cellular-slow": LinkClass(12.34, 4.52, "Ookla Global Index Oct 2020, India mobile"),
    "cellular": LinkClass(39.18, 11.63, "Ookla Global Index Oct 2020, global mobile"),
    "cellular-5g": LinkClass(166.13, 21.08, "Ookla Q3 2021, global median over 5G"),
    "broadband-slow": LinkClass(43.04, 36.77, "Ookla Global Index Aug 2020, India fixed"),
    "broadband": LinkClass(85.73, 45.74, "Ookla Global Index Sep 2020, global fixed"),
    "broadband-fast": LinkClass(218.07, 223.37, "Ookla Global Index Aug 2020, Singapore fixed"),
}


@dataclass(frozen=True)
class Segment:
    """A share of a fleet: each client of it gets one of ``compute`` and one of ``links``
    (uniformly, seeded)."""

    share: float
    compute: tuple[str, ...]
    links: tuple[str, ...]


#: the built-in fleets: the shares are our modelling choice, every number comes from a source
PROFILES: dict[str, tuple[Segment, ...]] = {
    # phones on cellular networks
    "mobile": (Segment(1.0, ("phone-cpu", "phone-gpu"),
                       ("cellular-slow", "cellular", "cellular-5g")),),
    # phones on cellular, phones on home Wi-Fi (behind fixed broadband), laptops on Wi-Fi
    "mixed": (Segment(0.4, ("phone-cpu", "phone-gpu"), ("cellular-slow", "cellular",
                                                        "cellular-5g")),
              Segment(0.3, ("phone-cpu", "phone-gpu"), ("broadband-slow", "broadband",
                                                        "broadband-fast")),
              Segment(0.3, ("laptop",), ("broadband-slow", "broadband", "broadband-fast"))),
    # every client the same: the lower end of a phone GPU on the global mobile average
    "uniform": (Segment(1.0, ("phone-gpu-low",), ("cellular",)),),
}

CSV_COLUMNS = ("client", "flops", "down_mbps", "up_mbps")


# ---------------------------------------------------------------------- a fleet
@dataclass(frozen=True)
class Device:
    """One client's device and link."""

    flops: float
    """Sustained training throughput, FLOP/s."""
    down_mbps: float
    up_mbps: float
    availability: float = 1.0
    """Probability of being online when sampled."""


@dataclass
class Fleet:
    """Every client's device, and the FLOPs of one training example (counted once per model,
    on first use)."""

    devices: list[Device]
    flops_per_example: float | None = None

    def offline(self, seed: int, rnd: int, client: int) -> bool:
        """Seeded: client ``client`` is offline when sampled in round ``rnd``."""
        p = self.devices[client].availability
        if p >= 1:
            return False
        return bool(np.random.default_rng([seed, rnd, client, _ONLINE_SALT]).random() >= p)

    def times(self, client: int, download_bytes: int, upload_bytes: int,
              example_passes: float) -> tuple[float, float, float]:
        """(download, compute, upload) seconds of ``client`` (module docstring's formula);
        ``example_passes`` = n_k · passes_k."""
        assert self.flops_per_example is not None
        d = self.devices[client]
        return (8.0 * download_bytes / (d.down_mbps * 1e6),
                example_passes * self.flops_per_example / d.flops,
                8.0 * upload_bytes / (d.up_mbps * 1e6))


def draw_profile(name: str, num_clients: int, seed: int) -> list[Device]:
    """Per client, a device and link of built-in fleet ``name``: a segment by its share, then a
    compute class and a link of that segment uniformly, then FLOP/s uniformly in the class's
    range. Same (name, K, seed) → the same fleet."""
    segments = PROFILES[name]
    rng = np.random.default_rng([int(seed), _DRAW_SALT])
    shares = np.array([s.share for s in segments], dtype=float)
    out = []
    for _ in range(num_clients):
        seg = segments[int(rng.choice(len(segments), p=shares / shares.sum()))]
        comp = COMPUTE[seg.compute[int(rng.integers(len(seg.compute)))]]
        link = LINKS[seg.links[int(rng.integers(len(seg.links)))]]
        flops = float(comp.low + (comp.high - comp.low) * rng.random())
        out.append(Device(flops, link.down_mbps, link.up_mbps))
    return out


#: the slowest device and link a fleet file may give: 1 FLOP/s, 1 bit/s. Slower is no device,
#: and 1e-310 made every time of the simulated clock infinite (written as Infinity in JSON)
FLOORS = {"flops": 1.0, "down_mbps": 1e-6, "up_mbps": 1e-6}
FLOOR_UNITS = {"flops": "1 FLOP/s", "down_mbps": "1 bit/s", "up_mbps": "1 bit/s"}


def read_fleet_csv(path: str | Path, num_clients: int) -> list[Device]:
    """One device per client from a CSV with columns ``client`` (0-based), ``flops``,
    ``down_mbps``, ``up_mbps`` and optionally ``availability`` (default 1); one-line
    :class:`UserError` on anything missing or out of range. Rows for clients ≥ ``num_clients``
    are not used (one fleet file serves runs of fewer clients)."""
    where = f"fleet.profile: '{path}'"
    try:
        with open(Path(str(path).strip()).expanduser(), newline="",
                  encoding="utf-8-sig") as f:  # Excel's BOM too
            reader = csv.DictReader(f)
            rows = list(reader)
            fields = reader.fieldnames or []
    except OSError as e:
        raise UserError(f"{where} cannot be read: {e.strerror or e}") from None
    except (UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"{where} is not a UTF-8 CSV file ({e})") from None
    missing = [c for c in CSV_COLUMNS if c not in fields]
    if missing:
        raise UserError(f"{where} lacks column(s) {', '.join(missing)} (needs "
                        f"{', '.join(CSV_COLUMNS)}, optional availability)")
    by_client: dict[int, Device] = {}
    for i, row in enumerate(rows, start=2):
        try:
            c = int(row["client"])
            vals = {k: float(row[k]) for k in ("flops", "down_mbps", "up_mbps")}
            avail = float(row["availability"]) if (row.get("availability") or "").strip() \
                else 1.0
        except (TypeError, ValueError):
            raise UserError(f"{where} line {i}: every value must be a number") from None
        bad = [k for k, v in vals.items() if not (math.isfinite(v) and v >= FLOORS[k])]
        if bad:
            raise UserError(f"{where} line {i}: column {bad[0]} must be a number ≥ "
                            f"{FLOORS[bad[0]]:g} ({FLOOR_UNITS[bad[0]]}), got {row[bad[0]]!r}")
        if not 0 < avail <= 1:
            raise UserError(f"{where} line {i}: availability must be in (0, 1], got {avail}")
        if c < 0:
            raise UserError(f"{where} line {i}: client ids start at 0, got {c}")
        if c in by_client:
            raise UserError(f"{where} line {i}: client {c} listed twice")
        by_client[c] = Device(vals["flops"], vals["down_mbps"], vals["up_mbps"], avail)
    absent = [c for c in range(num_clients) if c not in by_client]
    if absent:
        raise UserError(f"{where} has no row for client {absent[0]} (needs clients 0 … "
                        f"{num_clients - 1})")
    return [by_client[c] for c in range(num_clients)]


def build_fleet(cfg: Config) -> Fleet | None:
    """The run's fleet (None for ``fleet.profile = "none"``)."""
    profile = cfg.fleet.profile
    if profile == "none":
        return None
    if profile.startswith("csv:"):
        return Fleet(read_fleet_csv(profile[4:], cfg.data.num_clients))
    return Fleet(draw_profile(profile, cfg.data.num_clients, cfg.seed))


def check_config(cfg: Config) -> None:
    """A fleet CSV exists and has a valid row per client (one-line :class:`UserError`). With a
    natural partition's count still unknown (``data.num_clients = 0``) this runs once the data
    are read (:func:`lora_a2.experiment.prepare` checks the resolved config again)."""
    if cfg.fleet.profile.startswith("csv:") and clients_known(cfg):
        read_fleet_csv(cfg.fleet.profile[4:], cfg.data.num_clients)


def selected_per_round(cfg: Config, per_round: int) -> int:
    """Clients sampled per round under over-selection: ⌈per_round · (1 + over_select)⌉, at
    most K."""
    extra = cfg.train.over_select
    if extra <= 0:
        return per_round
    return min(cfg.data.num_clients, math.ceil(round(per_round * (1 + extra), 9)))


# ---------------------------------------------------------------------- FLOPs of a model
def training_flops_per_example(runtime: Any, batch: tuple[torch.Tensor, ...]) -> float:
    """FLOPs of one training step (task loss forward + backward, gradients for every federated
    parameter — both factors even where a method trains one a round, docs/FLEETS.md) on
    ``batch``, per example, by torch's
    FLOP counter, with one rule for every fused attention kernel, CPU's and CUDA's
    (:func:`~lora_a2.flops.flop_counter`: a model without attention dropout — Llama, SmolLM2 —
    trains with the fused kernel on CPU too). The model runs in train mode, as in local
    training, under a forked RNG so that its dropout draws change no later draw; nothing else
    is changed."""
    model = runtime.model
    trainable = list(runtime.params.values())
    before = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
        p.grad = None
    was_training = model.training
    model.train()
    device = torch.device(runtime.device)
    try:
        counter = flop_counter()
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), counter:
            runtime.task.loss(model, batch).backward()
        total = counter.get_total_flops()
    finally:
        for p in trainable:
            p.grad = None
        for p, g in zip(model.parameters(), before):
            p.requires_grad_(g)
        model.train(was_training)
    return float(total) / max(int(batch[0].shape[0]), 1)


# ---------------------------------------------------------------------- closing a round
@dataclass
class RoundClock:
    """Who a round keeps and how long it lasted on the simulated clock."""

    kept: list[int]
    stragglers: list[int]
    surplus: list[int]
    round_s: float


def close_round_clock(finish: dict[int, float], accepted: list[int], *, deadline_s: float,
                      target: int | None, waiting: bool) -> RoundClock:
    """Which accepted replies a round keeps (pure).

    ``finish``: simulated finish time of every client that replied; ``accepted``: those whose
    upload passed validation. A client with t_k > ``deadline_s`` (when > 0) is a straggler,
    whether or not its upload would have passed (the server stops waiting at the deadline, so
    the round lasts until then); t_k = ``deadline_s`` is on time. With over-selection
    (``target`` = clients per round) the server keeps the first ``target`` on-time finishers
    (ties by client id) and closes the round at the last kept one's time; the other on-time
    accepted replies are ``surplus``, and so is a refused reply that would arrive after that
    close (the server never received it: not a rejection). Otherwise the round lasts until the deadline when anyone it waits for is late
    or never replies (``waiting``: a dropout), else until the slowest reply."""
    late = {c for c, t in finish.items() if deadline_s > 0 and t > deadline_s}
    on_time = sorted((c for c in accepted if c not in late), key=lambda c: (finish[c], c))
    stragglers = sorted(late)
    if target is not None and len(on_time) >= target:
        kept, surplus = on_time[:target], on_time[target:]
        round_s = finish[kept[-1]]
        unread = [c for c, t in finish.items()
                  if c not in late and c not in accepted and t > round_s]
        return RoundClock(sorted(kept), stragglers, sorted(surplus + unread), round_s)
    if deadline_s > 0 and (stragglers or waiting):
        round_s = deadline_s
    else:
        round_s = max([t for t in finish.values() if deadline_s <= 0 or t <= deadline_s],
                      default=0.0)
    return RoundClock(sorted(on_time), stragglers, [], round_s)
