"""Everything a run needs before its first round, built once: data, partition, model, strategy.

Shared by every engine, so the same config gives the same clients, model and start everywhere.
The task (:mod:`lora_a2.tasks`) loads and encodes the data and builds the model; nothing here
depends on which task it is.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .adapter import ModelRuntime
from .client import EncodedData
from .config import Config, validate
from .data import partition
from .data.partition import NATURAL, natural_partition
from .data.readers import skipped_note
from .errors import UserError
from .fleet import Fleet, build_fleet
from .models import pick_device, position_limit
from .checks import check_config
from .private import PrivateStrategy, build_strategy
from .strategies import Strategy
from .strategies.context import ClientContext
from .tasks import LearningTask, get_task


@dataclass
class Experiment:
    cfg: Config
    train: Any  # the task's dataset type: ``labels`` (class / category ids), ``label_names``
    test: Any
    client_train: list[np.ndarray]  # per client: indices into ``train`` it trains on
    client_test: list[np.ndarray]  # per client: held-out local indices (empty unless enabled)
    strategy: Strategy | PrivateStrategy
    runtime: ModelRuntime
    enc_train: EncodedData
    enc_test: EncodedData
    task: LearningTask
    #: per client: what it keeps between its rounds (``ClientContext.store``). On the local
    #: engine the clients live in this process, so their memory lives here (and in the
    #: checkpoint); on Flower it lives on the nodes
    client_stores: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    #: the clients' devices and links (``fleet.profile``; None: no simulated clock)
    fleet: Fleet | None = None
    #: ``natural`` partition: client ``c``'s id value (a user, a film, a speaker); else None
    natural_ids: list[Any] | None = None

    @property
    def num_labels(self) -> int:
        return len(self.train.label_names)

    def client_context(self, client: int, store: dict[str, torch.Tensor] | None = None
                       ) -> ClientContext:
        """Client ``client``'s view: its training examples, its own test split, its store
        (default: the in-process one of :attr:`client_stores`)."""
        if store is None:
            store = self.client_stores.setdefault(client, {})
        return ClientContext(self.runtime, self.enc_train, self.client_train[client], self.cfg,
                             store=store, test_data=self.enc_test,
                             local_test=self.client_test[client])


def split_local_test(parts: list[np.ndarray], fraction: float, seed: int):
    """Hold out ``fraction`` of each client's examples (at least one stays for training)."""
    rng = np.random.default_rng(seed + 104729)
    train, test = [], []
    for idx in parts:
        n_test = int(round(fraction * len(idx))) if fraction > 0 else 0
        n_test = min(n_test, len(idx) - 1)
        perm = rng.permutation(idx)
        test.append(np.sort(perm[:n_test]))
        train.append(np.sort(perm[n_test:]))
    return train, test


def check_positions(cfg: Config, model, generated: int = 0) -> None:
    """Refuse a ``model.max_length`` past the model's learned position table (BERT, RoBERTa,
    GPT-2: the first forward pass would fail with an index error deep in the model). A
    table with a padding row (RoBERTa) counts positions after it; a model with rotary
    positions (Llama) has no table and no limit here."""
    positions = position_limit(model)
    if positions is not None and cfg.model.max_length > positions:
        raise UserError(f"config key 'model.max_length' must be ≤ {positions}, the positions "
                        f"model '{cfg.model.name}' has, got {cfg.model.max_length}")
    if positions is not None and generated and cfg.model.max_length + generated > positions:
        # evaluation generates ``generated`` tokens (the task's) after a prompt of max_length
        raise UserError(f"config key 'model.max_length' must be ≤ {positions} − "
                        f"task.max_new_tokens ({generated}) = "
                        f"{positions - generated}: model '{cfg.model.name}' has "
                        f"{positions} positions and evaluation generates after the prompt, got "
                        f"{cfg.model.max_length}")


def prepare(cfg: Config) -> Experiment:
    """Load and encode the data, partition the clients, build the model and the strategy.

    The experiment's config (:attr:`Experiment.cfg`) is ``cfg`` with the number of clients
    the partition drew (:func:`resolve_clients`): a ``natural`` partition knows it only once
    the data are read and encoded, and everything built here (the strategy's budgets, the DP
    sampling rate, the rounds' sampling, Flower's nodes) reads it from there.
    """
    check_config(cfg)  # the components' checks, whoever built cfg
    if cfg.engine.threads:
        torch.set_num_threads(cfg.engine.threads)
    task = get_task(cfg)
    train, test = task.load_data()
    base = task.load_model(len(train.label_names), cfg.seed)  # (model, tokenizer, source)
    check_positions(cfg, base[0], task.generated_tokens())
    # Encoding may drop examples that cannot fit (counted in the datasets' stats), so the
    # partition is drawn over what was encoded.
    enc_train, train = task.encode(base[1], train, "train")
    enc_test, test = task.encode(base[1], test, "test")
    parts, natural_ids = draw_clients(cfg, train)
    run_cfg = resolve_clients(cfg, len(parts))
    strategy = build_strategy(run_cfg)  # wrapped in the DP wrapper when privacy is on
    runtime = ModelRuntime(cfg.model, len(train.label_names), strategy.lora_rank(), cfg.seed,
                           pick_device(cfg.engine.device), task=task, base=base,
                           precision=cfg.train.precision, bf16_matmul=cfg.train.bf16_matmul)
    strategy.bind(runtime.layout)
    client_train, client_test = split_local_test(parts, run_cfg.data.local_test_fraction,
                                                 cfg.seed)
    strategy.bind_clients([len(idx) for idx in client_train])
    return Experiment(run_cfg, train, test, client_train, client_test, strategy, runtime,
                      enc_train, enc_test, task, fleet=build_fleet(run_cfg),
                      natural_ids=natural_ids)


def draw_clients(cfg: Config, train: Any) -> tuple[list[np.ndarray], list[Any] | None]:
    """The clients' training indices into ``train`` and, for a ``natural`` partition, each
    client's id value (None otherwise). A partition that fails for want of rows or clients
    says what the loader and the encoder skipped, and why."""
    d = cfg.data
    if d.partition == NATURAL:
        drawn = natural_partition(train.client_ids, num_clients=d.num_clients,
                                  min_examples=d.min_examples_per_client,
                                  max_examples=d.max_train_examples,
                                  column=train.stats.get("natural_clients", {}).get(
                                      "column", d.client_column),
                                  stats=train.stats)
        return drawn.parts, drawn.natural_ids
    try:
        parts = partition(train.labels, d.num_clients, d.partition, alpha=d.alpha,
                          classes_per_client=d.classes_per_client,
                          min_examples=d.min_examples_per_client, seed=cfg.seed)
    except UserError as e:
        note = skipped_note(train.stats)
        if not note:
            raise
        raise UserError(f"{e}{note}") from None
    return parts, None


def resolve_clients(cfg: Config, num_clients: int) -> Config:
    """``cfg`` with ``data.num_clients`` = the partition's client count: ``cfg`` itself when
    it already says so, else a validated copy (the user's config, as written to config.toml
    and compared on resume, keeps its own value: 0 = every natural client)."""
    if cfg.data.num_clients == num_clients:
        return cfg
    resolved = copy.deepcopy(cfg)
    resolved.data.num_clients = num_clients
    validate(resolved)  # the checks against the count, skipped while it was unknown
    return check_config(resolved)


def data_digest(exp: Experiment) -> str:
    """SHA-256 of the data the clients train and are tested on: the encoded training and test
    sets (token ids, masks, labels) and each client's training and local-test indices. A
    resumed run must read exactly the data it trained on, wherever its paths now resolve."""
    h = hashlib.sha256()
    for enc in (exp.enc_train, exp.enc_test):
        for t in (enc.input_ids, enc.attention_mask, enc.labels):
            t = t.detach().cpu().contiguous()
            h.update(f"{tuple(t.shape)}{t.dtype}".encode())
            h.update(t.numpy())  # the buffer itself, not a copy of it
    for idx in [*exp.client_train, *exp.client_test]:
        arr = np.asarray(idx, dtype=np.int64)
        h.update(f"|{len(arr)}|".encode())
        h.update(arr)
    return h.hexdigest()
