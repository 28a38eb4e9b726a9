"""Split training examples over federated clients: IID or label-skewed (non-IID).

:func:`partition` returns one sorted int64 index array per client. Every example goes to
exactly one client, and every client gets at least ``min_examples`` examples.

Methods
-------
``iid``
    flwr-datasets ``IidPartitioner`` over a seeded shuffle (the partitioner itself cuts
    contiguous shards and does not shuffle). Sizes differ by at most one.
``dirichlet``
    flwr-datasets ``DirichletPartitioner`` (Yurochkin et al. 2019): for each class, client
    shares ~ Dirichlet(alpha); small alpha = strong label skew, and also unequal client sizes.
    ``min_partition_size=0`` (its resampling loop would raise after 10 tries at small alpha;
    the minimum is enforced here instead) and ``self_balancing=False`` (plain Dirichlet).
``pathological``
    flwr-datasets ``PathologicalPartitioner`` gives each client exactly
    ``classes_per_client`` classes, and each class's examples are split evenly (to within
    one) among the clients that hold it. Its own class-assignment modes are not used as is:
    ``random`` and ``first-deterministic`` can leave classes with no client (it then drops
    their examples with only a warning) and ``deterministic`` (client ``p`` gets classes
    ``p .. p+k-1``) needs ``num_clients + k - 1 >= C`` to cover all classes. Instead it runs
    in ``deterministic`` mode with one class per partition over ``num_clients * k`` "slots"
    (slot ``v`` holds class ``v % C`` of a seeded class permutation; every class gets the same
    number of slots, to within one), and the slots are dealt to clients: each client takes the
    ``k`` distinct classes with the most free slots left, seeded-random among ties. This covers
    every class whenever ``num_clients * k >= C`` (:class:`UserError` otherwise), balances
    how many clients hold each class, and gives irregularly overlapping class sets (a deal
    that repeats a set is redrawn, up to 20 times, while distinct sets are possible).
``paired``
    The LoRA-A2-style variant as implemented here (the paper's exact recipe was not at hand):
    clients come in pairs that hold the *same* classes. Clients ``(0, 1), (2, 3), ...`` form
    groups (with an odd count the last group has three clients; a single client is its own
    group); the groups get classes exactly as ``pathological`` gives them to clients; within
    a group each class's examples are split evenly (to within one) among its clients. So
    each class set is held by one pair, and different pairs hold different sets as far as
    the redraws above achieve it. Coverage needs ``num_groups * k >= C``.

Minimum size
------------
Dirichlet splits at small alpha leave clients empty. After partitioning, each client below
``min_examples`` (in client order) receives randomly chosen (seeded) examples from the
currently largest client until it reaches the minimum, preferring one class (the
receiver's main class if the donor has it, else the donor's main class). The moved examples
can still be of classes the receiver did not hold, so this slightly dilutes the label skew
(at most ``num_clients * min_examples`` examples move; :func:`label_histogram` shows the
result). With ``min_examples=0`` nothing moves.

Natural clients
---------------
:func:`natural_partition` does not draw clients: each distinct value of an id column (a user,
a film, a speaker) is one client (flwr-datasets ``NaturalIdPartitioner``), indexed in the
sorted order of the values. A client below ``min_examples`` is dropped (its rows counted as
skipped), never topped up: moving rows between users would break the partition. A client
count and a row cap select whole clients, largest first.
"""

from __future__ import annotations

import contextlib
import io
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lora_a2.errors import UserError

from .readers import (SKIP_BEYOND_CAP, SKIP_BEYOND_CLIENTS, SKIP_SMALL_CLIENT, client_key,
                      count_skip, skipped_note)

PARTITION_METHODS: tuple[str, ...] = ("iid", "dirichlet", "pathological", "paired")
"""The label-based methods of :func:`partition` (``natural`` is :func:`natural_partition`)."""
NATURAL = "natural"

# Independent random streams derived from the one user seed.
_ORDER_STREAM, _CLASS_STREAM, _TOPUP_STREAM, _DEAL_STREAM = 11, 12, 13, 14
_DEAL_TRIES = 20


def partition(
    labels: np.ndarray,
    num_clients: int,
    method: str,
    *,
    alpha: float = 0.5,
    classes_per_client: int = 2,
    min_examples: int = 2,
    seed: int = 0,
) -> list[np.ndarray]:
    """Assign every example to one of ``num_clients`` clients.

    Parameters
    ----------
    labels : numpy.ndarray
        1-D class labels of the training examples (any sortable values; usually int ids).
    num_clients : int
        Number of clients, at least 1.
    method : str
        One of :data:`PARTITION_METHODS` (see the module docstring).
    alpha : float
        Dirichlet concentration (``dirichlet`` only), > 0; 0.01 is extreme skew.
    classes_per_client : int
        Classes per client (``pathological``) or per pair (``paired``), 1..number of classes.
    min_examples : int
        Every client ends with at least this many examples (>= 0).
    seed : int
        Same inputs and seed give the same partition.

    Returns
    -------
    list of numpy.ndarray
        ``num_clients`` sorted int64 arrays of positions into ``labels``; disjoint, and
        together they cover every position.

    Raises
    ------
    UserError
        Bad parameter values, too few examples for the clients, or a class layout the
        pathological methods cannot cover.
    """
    labels = _check_labels(labels)
    _check_common(labels, num_clients, method, min_examples, seed)
    classes, class_ids = np.unique(labels, return_inverse=True)
    class_ids = class_ids.astype(np.int64)
    # flwr partitioners split each class in row order; a seeded shuffle makes which examples
    # a client gets random (and seed-dependent) rather than "the first rows of the file".
    order = np.random.default_rng([seed, _ORDER_STREAM]).permutation(len(labels))

    if method == "iid":
        parts = _iid(class_ids, order, num_clients)
    elif method == "dirichlet":
        _check_alpha(alpha)
        parts = _dirichlet(class_ids, order, num_clients, float(alpha), seed)
    else:
        _check_classes_per_client(classes_per_client, len(classes))
        groups = (
            _client_groups(num_clients)
            if method == "paired"
            else [[c] for c in range(num_clients)]
        )
        _check_coverage(method, classes, class_ids, len(groups), classes_per_client, seed)
        group_parts = _pathological(class_ids, order, len(groups), classes_per_client, seed)
        parts = _split_groups(group_parts, groups, class_ids, num_clients)

    parts = _enforce_minimum(
        parts, class_ids, min_examples, np.random.default_rng([seed, _TOPUP_STREAM])
    )
    return [np.sort(p).astype(np.int64) for p in parts]


@dataclass
class NaturalPartition:
    """Clients of a natural partition and what was left out (see :func:`natural_partition`).

    ``parts[c]`` holds the positions of client ``c``, whose id value is ``natural_ids[c]``;
    clients are in the sorted order of their ids. ``counts`` says how many clients the data
    had (``found``), how many were dropped below the minimum (``below_min``) or left out by
    the client count (``beyond_num_clients``) or the row cap (``beyond_max_train_examples``),
    and how many remain (``clients``)."""

    parts: list[np.ndarray]
    natural_ids: list[Any]
    counts: dict[str, int] = field(default_factory=dict)


def natural_partition(
    client_ids: list[Any],
    *,
    num_clients: int = 0,
    min_examples: int = 1,
    max_examples: int = 0,
    column: str = "",
    stats: dict[str, Any] | None = None,
) -> NaturalPartition:
    """One client per distinct id value (flwr-datasets ``NaturalIdPartitioner``).

    Parameters
    ----------
    client_ids : list
        The id value of every training example (``None``: none; such rows are an error here,
        the loaders skip them).
    num_clients : int
        0 = every client; a positive value keeps the largest that many (ties: the smaller id).
    min_examples : int
        A client with fewer examples is dropped; its rows are counted in ``stats`` as skipped.
    max_examples : int
        0 = no cap; else the largest clients whose examples together fit under the cap.
    column : str
        The id column, for messages.
    stats : dict, optional
        The dataset's row accounting (``read`` / ``kept`` / ``skipped``); gets the small
        clients' rows and a ``natural_clients`` entry (:attr:`NaturalPartition.counts` and the
        column).

    Returns
    -------
    NaturalPartition
        Sorted int64 position arrays, one per kept client, in the sorted order of the ids.

    Raises
    ------
    UserError
        Fewer clients left than asked for, none left, or none fits under the cap; the message
        names what was skipped and why.
    """
    if not client_ids:
        raise UserError("cannot partition an empty training set (0 examples)")
    keys = [client_key(v) for v in client_ids]
    if any(k is None for k in keys):
        raise UserError(f"natural partition: an example has no client id (column '{column}')")
    if not all(isinstance(k, int) for k in keys):
        keys = [str(k) for k in keys]  # one type: ints sort as numbers, anything else as text
    groups = _natural_groups(keys)
    by = f" by '{column}'" if column else ""
    small = [(nid, rows) for nid, rows in groups if len(rows) < min_examples]
    count_skip(stats, SKIP_SMALL_CLIENT, sum(len(rows) for _, rows in small))
    big = [(nid, rows) for nid, rows in groups if len(rows) >= min_examples]
    counts = {"found": len(groups), "below_min": len(small), "beyond_num_clients": 0,
              "beyond_max_train_examples": 0}
    if not big:
        largest = max(len(rows) for _, rows in groups)
        raise UserError(f"no natural client{by} has data.min_examples_per_client = "
                        f"{min_examples} training examples ({len(groups)} clients, the largest "
                        f"{largest}){skipped_note(stats)}")
    order = sorted(range(len(big)), key=lambda i: -len(big[i][1]))  # stable: ties by id
    if num_clients > 0:
        if len(big) < num_clients:
            raise UserError(f"data.num_clients = {num_clients}, but only {len(big)} natural "
                            f"clients{by} have data.min_examples_per_client = {min_examples} "
                            f"training examples ({len(small)} of {len(groups)} below)"
                            f"{skipped_note(stats)}")
        counts["beyond_num_clients"] = len(order) - num_clients
        count_skip(stats, SKIP_BEYOND_CLIENTS, sum(len(big[i][1]) for i in order[num_clients:]))
        order = order[:num_clients]
    if max_examples > 0:
        total, fit = 0, 0
        for i in order:
            if total + len(big[i][1]) > max_examples:
                break
            total += len(big[i][1])
            fit += 1
        if fit == 0:
            raise UserError(f"data.max_train_examples = {max_examples} is smaller than the "
                            f"largest natural client{by} ({len(big[order[0]][1])} examples); "
                            "raise it or set 0 (a natural partition keeps whole clients)")
        if 0 < fit < num_clients:
            need = sum(len(big[i][1]) for i in order)
            raise UserError(f"data.num_clients = {num_clients}, but only the largest {fit} "
                            f"natural clients{by} fit under data.max_train_examples = "
                            f"{max_examples} (the {num_clients} largest hold {need} examples); "
                            "raise the cap, set it to 0, or lower data.num_clients")
        counts["beyond_max_train_examples"] = len(order) - fit
        count_skip(stats, SKIP_BEYOND_CAP, sum(len(big[i][1]) for i in order[fit:]))
        order = order[:fit]
    kept = sorted(order)  # back to the sorted order of the ids
    counts["clients"] = len(kept)
    if stats is not None:
        stats["natural_clients"] = {"column": column, **counts}
    return NaturalPartition([np.sort(big[i][1]).astype(np.int64) for i in kept],
                            [big[i][0] for i in kept], counts)


def _natural_groups(keys: list[Any]) -> list[tuple[Any, np.ndarray]]:
    """(id, positions) per distinct id, in sorted id order, from flwr's partitioner."""
    import datasets
    from flwr_datasets.partitioner import NaturalIdPartitioner

    partitioner = NaturalIdPartitioner(partition_by="client")
    partitioner.dataset = datasets.Dataset.from_dict({"client": keys,
                                                      "row": list(range(len(keys)))})
    with contextlib.redirect_stderr(io.StringIO()):  # its tqdm bar over the rows
        rows = [np.asarray(partitioner.load_partition(p)["row"], dtype=np.int64)
                for p in range(partitioner.num_partitions)]
    ids = partitioner.partition_id_to_natural_id
    return [(_plain(ids[p]), r) for p, r in enumerate(rows)]


def _plain(value: Any) -> Any:
    """A numpy scalar as the Python value (partition.json is JSON)."""
    return value.item() if isinstance(value, np.generic) else value


def label_histogram(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """Examples per client and class.

    Parameters
    ----------
    labels : numpy.ndarray
        Integer class ids in ``[0, num_classes)``.
    parts : list of numpy.ndarray
        Index arrays, as returned by :func:`partition`.
    num_classes : int
        Number of columns.

    Returns
    -------
    numpy.ndarray
        int64 array of shape ``(len(parts), num_classes)``.
    """
    labels = np.asarray(labels, dtype=np.int64)
    histogram = np.zeros((len(parts), num_classes), dtype=np.int64)
    for client, idx in enumerate(parts):
        histogram[client] = np.bincount(
            labels[np.asarray(idx, dtype=np.int64)], minlength=num_classes
        )[:num_classes]
    return histogram


# --------------------------------------------------------------------------- validation


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_labels(labels: Any) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise UserError(f"labels must be a 1-D array, got shape {labels.shape}")
    if len(labels) == 0:
        raise UserError("cannot partition an empty training set (0 examples)")
    return labels


def _check_common(
    labels: np.ndarray, num_clients: int, method: str, min_examples: int, seed: int
) -> None:
    if method not in PARTITION_METHODS:
        raise UserError(
            f"unknown partition method '{method}' (valid: {', '.join(PARTITION_METHODS)})"
        )
    if not _is_int(num_clients) or num_clients < 1:
        raise UserError(f"number of clients must be an integer >= 1, got {num_clients!r}")
    if not _is_int(min_examples) or min_examples < 0:
        raise UserError(f"min examples per client must be an integer >= 0, got {min_examples!r}")
    if not _is_int(seed) or seed < 0:
        raise UserError(f"seed must be a non-negative integer, got {seed!r}")
    if num_clients * min_examples > len(labels):
        raise UserError(
            f"more clients ({num_clients}) × min examples ({min_examples}) than training "
            f"examples ({len(labels)})"
        )
    if num_clients > len(labels):
        raise UserError(f"more clients ({num_clients}) than training examples ({len(labels)})")


def _check_alpha(alpha: float) -> None:
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, numbers.Real)
        or not (np.isfinite(alpha) and alpha > 0)
    ):
        raise UserError(f"dirichlet alpha must be a finite number > 0, got {alpha!r}")


def _check_classes_per_client(classes_per_client: int, num_classes: int) -> None:
    if not _is_int(classes_per_client) or not 1 <= classes_per_client <= num_classes:
        raise UserError(
            f"classes per client must be an integer between 1 and the number of classes "
            f"({num_classes}), got {classes_per_client!r}"
        )


def _check_coverage(
    method: str,
    classes: np.ndarray,
    class_ids: np.ndarray,
    num_groups: int,
    classes_per_client: int,
    seed: int,
) -> None:
    """Fail before flwr does (with its multi-line ValueError) or drops classes silently."""
    num_classes = len(classes)
    holders = _holders_per_class(num_groups, num_classes, classes_per_client, seed)
    who = ("client pair" if method == "paired" else "client") + ("" if num_groups == 1 else "s")
    if num_groups * classes_per_client < num_classes:
        raise UserError(
            f"{method} split: {num_groups} {who} with {classes_per_client} classes each "
            f"cannot cover all {num_classes} classes; use more clients, more classes per "
            "client, or 'dirichlet'"
        )
    counts = np.bincount(class_ids, minlength=num_classes)
    short = np.flatnonzero(counts < holders)
    if len(short):
        c = int(short[0])
        raise UserError(
            f"{method} split: class '{classes[c]}' has {counts[c]} examples but "
            f"{holders[c]} {who} must share it; use fewer clients or classes per client"
        )


# --------------------------------------------------------------------------- methods


def _run_flwr(partitioner: Any, class_ids: np.ndarray, order: np.ndarray) -> list[np.ndarray]:
    """Apply a flwr-datasets partitioner to shuffled rows; return original positions."""
    import datasets

    table = datasets.Dataset.from_dict({"label": class_ids[order].tolist(), "row": order.tolist()})
    partitioner.dataset = table
    # flwr's warnings (unused classes, Dirichlet resampling) cannot occur with the settings
    # used here, so none are silenced: one showing up would mean a real problem.
    return [
        np.asarray(partitioner.load_partition(p)["row"], dtype=np.int64)
        for p in range(partitioner.num_partitions)
    ]


def _iid(class_ids: np.ndarray, order: np.ndarray, num_clients: int) -> list[np.ndarray]:
    from flwr_datasets.partitioner import IidPartitioner

    return _run_flwr(IidPartitioner(num_partitions=num_clients), class_ids, order)


def _dirichlet(
    class_ids: np.ndarray, order: np.ndarray, num_clients: int, alpha: float, seed: int
) -> list[np.ndarray]:
    from flwr_datasets.partitioner import DirichletPartitioner

    partitioner = DirichletPartitioner(
        num_partitions=num_clients,
        partition_by="label",
        alpha=alpha,
        min_partition_size=0,
        self_balancing=False,
        shuffle=False,
        seed=seed,
    )
    return _run_flwr(partitioner, class_ids, order)


def _class_permutation(num_classes: int, seed: int) -> np.ndarray:
    return np.random.default_rng([seed, _CLASS_STREAM]).permutation(num_classes)


def _holders_per_class(
    num_groups: int, num_classes: int, classes_per_client: int, seed: int
) -> np.ndarray:
    """Groups holding each (original) class: the flwr slots of its permuted id."""
    slots = num_groups * classes_per_client
    per_permuted_id = np.array([len(range(k, slots, num_classes)) for k in range(num_classes)])
    return per_permuted_id[_class_permutation(num_classes, seed)]


def _pathological(
    class_ids: np.ndarray, order: np.ndarray, num_groups: int, classes_per_client: int, seed: int
) -> list[np.ndarray]:
    """One flwr partition per (group, class slot), then slots dealt to groups.

    flwr's deterministic mode with one class per partition gives slot ``v`` the class
    ``v % C`` and splits each class evenly over its slots. Classes are first relabelled by a
    seeded permutation (so which classes get an extra slot is random); the slots are then
    dealt to groups by :func:`_deal_slots`.
    """
    from flwr_datasets.partitioner import PathologicalPartitioner

    num_classes = int(class_ids.max()) + 1
    relabel = _class_permutation(num_classes, seed)
    partitioner = PathologicalPartitioner(
        num_partitions=num_groups * classes_per_client,
        partition_by="label",
        num_classes_per_partition=1,
        class_assignment_mode="deterministic",
        shuffle=False,
        seed=seed,
    )
    slot_rows = _run_flwr(partitioner, relabel[class_ids], order)
    rng = np.random.default_rng([seed, _DEAL_STREAM])
    layout = _deal_slots(num_groups, classes_per_client, num_classes, rng)
    return [np.concatenate([slot_rows[v] for v in slots]) for slots in layout]


def _deal_slots(
    num_groups: int, classes_per_client: int, num_classes: int, rng: np.random.Generator
) -> list[list[int]]:
    """Give each group ``classes_per_client`` slots of distinct classes.

    Each group takes the classes with the most free slots left, random among ties. Free
    counts start balanced (differ by at most one) and stay balanced, so every group finds
    enough distinct classes; the random tie-break makes the class sets seed-dependent and
    overlapping irregularly (no fixed rings or clusters). A deal that repeats a class set is
    redrawn (a few tries) when there are enough distinct sets for all groups.
    """
    distinct_sets_exist = math.comb(num_classes, classes_per_client) >= num_groups
    for _ in range(_DEAL_TRIES):
        layout = _deal_once(num_groups, classes_per_client, num_classes, rng)
        sets = {frozenset(v % num_classes for v in slots) for slots in layout}
        if not distinct_sets_exist or len(sets) == num_groups:
            break
    return layout


def _deal_once(
    num_groups: int, classes_per_client: int, num_classes: int, rng: np.random.Generator
) -> list[list[int]]:
    total = num_groups * classes_per_client
    free = [list(range(k, total, num_classes)) for k in range(num_classes)]  # slot v: class v % C
    layout = []
    for _ in range(num_groups):
        remaining = np.array([len(f) for f in free])
        chosen = np.lexsort((rng.random(num_classes), -remaining))[:classes_per_client]
        layout.append([free[k].pop() for k in chosen])
    return layout


def _client_groups(num_clients: int) -> list[list[int]]:
    """Pairs (0, 1), (2, 3), ...; an odd client out joins the last pair."""
    if num_clients == 1:
        return [[0]]
    groups = [[c, c + 1] for c in range(0, num_clients - 1, 2)]
    if num_clients % 2:
        groups[-1].append(num_clients - 1)
    return groups


def _split_groups(
    group_parts: list[np.ndarray],
    groups: list[list[int]],
    class_ids: np.ndarray,
    num_clients: int,
) -> list[np.ndarray]:
    """Split each group's examples of each class evenly among the group's clients."""
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for rows, members in zip(group_parts, groups, strict=True):
        for cls in np.unique(class_ids[rows]):
            chunks = np.array_split(rows[class_ids[rows] == cls], len(members))
            # Rotate who gets the larger chunk so remainders do not pile up on one client.
            for j, chunk in enumerate(chunks):
                parts[members[(j + int(cls)) % len(members)]].append(chunk)
    return [
        np.concatenate(p).astype(np.int64) if p else np.zeros(0, dtype=np.int64) for p in parts
    ]


# --------------------------------------------------------------------------- minimum size


def _enforce_minimum(
    parts: list[np.ndarray], class_ids: np.ndarray, min_examples: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Top up clients below ``min_examples`` with random examples of the largest client.

    Feasible because ``num_clients * min_examples <= total`` was checked: while a client is
    short, the largest one has more than the minimum. The donor's examples of one class are
    preferred (the receiver's main class if the donor has it, else the donor's main class), so
    a topped-up client stays as label-skewed as it can.
    """
    parts = [np.asarray(p, dtype=np.int64) for p in parts]
    for client in range(len(parts)):
        while len(parts[client]) < min_examples:
            donor = int(np.argmax([len(p) for p in parts]))  # first largest: deterministic
            take = min(min_examples - len(parts[client]), len(parts[donor]) - min_examples)
            picked = _pick_for_topup(class_ids[parts[donor]], class_ids[parts[client]], take, rng)
            parts[client] = np.concatenate([parts[client], parts[donor][picked]])
            parts[donor] = np.delete(parts[donor], picked)
    return parts


def _pick_for_topup(
    donor_labels: np.ndarray, receiver_labels: np.ndarray, take: int, rng: np.random.Generator
) -> np.ndarray:
    """Positions (into the donor) of ``take`` examples, one preferred class first."""
    preferred = int(np.bincount(donor_labels).argmax())
    if len(receiver_labels):
        counts = np.bincount(receiver_labels)
        for cls in np.argsort(-counts, kind="stable")[: np.count_nonzero(counts)]:
            if (donor_labels == cls).any():
                preferred = int(cls)
                break
    same = rng.permutation(np.flatnonzero(donor_labels == preferred))
    other = rng.permutation(np.flatnonzero(donor_labels != preferred))
    return np.concatenate([same, other])[:take]
