"""Everything a run needs before its first round, built once: data, partition, model, strategy.

Shared by every engine, so the same config gives the same clients, model and start everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .adapter import ModelRuntime
from .client import EncodedData, encode_texts
from .config import Config
from .data import TextDataset, load_dataset, partition  # noqa
from .models import pick_device
from .strategies import Strategy, get_strategy


@dataclass
class Experiment:
    cfg: Config
    train: TextDataset
    test: TextDataset
    client_train: list[np.ndarray]  # per client: indices into ``train`` it trains on
    client_test: list[np.ndarray]  # per client: held-out local indices (empty unless enabled)
    strategy: Strategy
    runtime: ModelRuntime
    enc_train: EncodedData
    enc_test: EncodedData

    @property
    def num_labels(self) -> int:
        return len(self.train.label_names)


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


def prepare(cfg: Config) -> Experiment:
    """Load and split the data, partition it over clients, build the model and the strategy."""
    if cfg.engine.threads:
        torch.set_num_threads(cfg.engine.threads)
    d = cfg.data
    train, test = load_dataset(
        d.name, text_column=d.text_column or None, label_column=d.label_column or None,
        seed=cfg.seed, test_fraction=d.test_fraction,
        max_train_examples=d.max_train_examples or None,
        max_test_examples=d.max_test_examples or None)
    parts = partition(train.labels, d.num_clients, d.partition, alpha=d.alpha,
                      classes_per_client=d.classes_per_client,
                      min_examples=d.min_examples_per_client, seed=cfg.seed)
    client_train, client_test = split_local_test(parts, d.local_test_fraction, cfg.seed)
    strategy = get_strategy(cfg)
    runtime = ModelRuntime(cfg.model, len(train.label_names), strategy.lora_rank(), cfg.seed,
                           pick_device(cfg.engine.device))
    strategy.bind(runtime.layout)
    enc_train = encode_texts(runtime.tokenizer, train.texts, train.labels, cfg.model.max_length)
    enc_test = encode_texts(runtime.tokenizer, test.texts, test.labels, cfg.model.max_length)
    return Experiment(cfg, train, test, client_train, client_test, strategy, runtime, enc_train,
                      enc_test)
