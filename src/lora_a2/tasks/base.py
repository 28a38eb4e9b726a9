"""The task interface and its registry.

A :class:`LearningTask` is everything that depends on *what* is learned: which data sources and
base models fit it, how examples become tensors, the loss, the evaluation, the headline metric
and PEFT's ``task_type`` for the exported adapter. Everything that depends on *how* a federation
learns (strategies, aggregation, privacy, payloads, validation, checkpoints, engines) only sees
the model's federated parameters and calls :meth:`LearningTask.loss` through the client loop.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor, nn

from ..config import Config
from ..errors import UserError

if TYPE_CHECKING:  # only for annotations: tasks are imported by the runtime, not the reverse
    from ..adapter import ModelRuntime
    from ..client import EncodedData
    from ..experiment import Experiment

TASKS: dict[str, type[LearningTask]] = {}


def client_column(cfg: Config) -> str | None:
    """The column a task's loader reads natural client ids from: ``data.client_column`` with
    ``data.partition = "natural"`` (``""``: the built-in dataset's own), else None (no ids)."""
    return cfg.data.client_column if cfg.data.partition == "natural" else None


def register_task(cls: type[LearningTask]) -> type[LearningTask]:
    """Class decorator: make a task available by its ``name`` (``task.name``)."""
    TASKS[cls.name] = cls
    return cls


class LearningTask(ABC):
    """What is learned: data, encoding, loss, evaluation and export type (module docstring)."""

    name: ClassVar[str]
    #: the headline metric in ``metrics.jsonl``, e.g. ``accuracy``
    metric: ClassVar[str]
    #: the headline metric's direction (``report.targets`` are reached from below when True)
    metric_higher_is_better: ClassVar[bool] = True
    #: the headline metric's range (``report.targets`` outside it are refused: 70 for 70 %
    #: could never be reached); None = unbounded (a loss, say)
    metric_range: ClassVar[tuple[float, float] | None] = (0.0, 1.0)
    #: how plots and the console name it
    metric_label: ClassVar[str]
    #: (metrics key, axis label, scale) of each plot in ``DIR/plots/``
    plots: ClassVar[tuple[tuple[str, str, float], ...]] = ()
    #: PEFT's ``task_type`` of the exported adapter
    peft_task_type: ClassVar[str]
    #: built-in model and dataset names that belong to this task (for ``task.name = "auto"``)
    model_names: ClassVar[tuple[str, ...]] = ()
    data_names: ClassVar[tuple[str, ...]] = ()
    #: the trained model generates text (``lora-a2 generate`` can talk to it)
    generative: ClassVar[bool] = False
    #: what ``lora-a2 bench --smoke`` sets for a cell of this task: a tiny model built in code,
    #: few examples, two rounds (the bench adds nothing of its own)
    smoke_overrides: ClassVar[dict[str, Any]] = {}
    #: the figures of a cell's summary that ``lora-a2 bench`` tabulates: (key, scale)
    bench_columns: ClassVar[tuple[tuple[str, float], ...]] = ()
    #: the sentence under a bench table that says what its columns are
    bench_note: ClassVar[str] = ""
    #: the task the config means when no task claims its model or data
    fallback: ClassVar[bool] = False
    #: what a client's evaluation answer (:meth:`evaluate_client`) must hold: key → (low,
    #: high, may be None); the server refuses an answer with a key missing, extra or out of
    #: range (empty: the task has no per-client evaluation)
    client_eval_ranges: ClassVar[dict[str, tuple[float, float, bool]]] = {}
    #: config keys ("section.field") only this task reads: set away from their default for
    #: another task they would do nothing, so that task's :meth:`check` refuses them
    own_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    @classmethod
    def claims(cls, cfg: Config) -> bool:
        """True when the config's model or data can only mean this task."""
        return cfg.model.name in cls.model_names or cfg.data.name in cls.data_names

    def generated_tokens(self) -> int:
        """Tokens evaluation generates after a prompt of up to ``model.max_length`` (a model with
        a learned position table must have room for both); 0 for a task that generates none."""
        return 0

    def check(self, cfg: Config) -> None:
        """Refuse a model or dataset that belongs to another task (one-line :class:`UserError`)."""
        why = (f"the data '{cfg.data.name}' is {self.name} data" if cfg.task.name == "auto"
               else f"task.name is '{self.name}'")
        for other in TASKS.values():
            if other is type(self):
                continue
            if cfg.model.name in other.model_names:
                mine = ", ".join(self.model_names)
                raise UserError(f"model '{cfg.model.name}' is a {other.name} model, but {why}; "
                                f"use a {self.name} model ({mine}, or a hub name / folder)")
            if cfg.data.name in other.data_names:
                raise UserError(f"dataset '{cfg.data.name}' is {other.name} data, but the task "
                                f"is '{self.name}' (model '{cfg.model.name}'); use "
                                f"{self.name} data ({', '.join(self.data_names)}, or a file)")
        defaults = Config()
        for other in TASKS.values():
            for key in () if other is type(self) else other.own_keys:
                section, name = key.split(".")
                value = getattr(getattr(cfg, section), name)
                if value != getattr(getattr(defaults, section), name):
                    raise UserError(f"config key '{key}' is read only by task '{other.name}'; "
                                    f"this run's task is '{self.name}' (model "
                                    f"'{cfg.model.name}', data '{cfg.data.name}'), got {value!r}")

    # -- data -------------------------------------------------------------------
    @abstractmethod
    def load_data(self) -> tuple[Any, Any]:
        """``(train, test)`` datasets. Each has ``labels`` (the int class or category per
        example, which the non-IID partitioners split on), ``label_names`` and ``stats``
        (rows read / kept / skipped with reasons), and a ``subset(idx)`` method."""

    @abstractmethod
    def encode(self, tokenizer, dataset: Any, split: str) -> tuple[EncodedData, Any]:
        """Tokenise ``dataset`` once; return the tensors and the dataset they cover (rows that
        cannot be encoded are dropped *and counted* in ``stats``)."""

    # -- model ------------------------------------------------------------------
    @abstractmethod
    def load_model(self, num_labels: int, seed: int) -> tuple[nn.Module, Any, str | None]:
        """``(base model, tokenizer, source)``; ``source`` is what the adapter records as its
        base (None for a model built in code)."""

    def head_attr(self, model: nn.Module) -> str | None:
        """Attribute of a task head outside the LoRA targets (a classifier), or None."""
        return None

    # -- training and evaluation ------------------------------------------------
    @abstractmethod
    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        """Mean training loss of one batch ``(input_ids, attention_mask, labels)``. Called
        under the runtime's precision context (``train.precision``): take the loss of float32
        logits, so a bfloat16 forward pass still gives a float32 loss."""

    @abstractmethod
    def evaluate(self, exp: Experiment) -> dict[str, Any]:
        """Metrics of the model's current state (the global test set, and per client where the
        task defines it). A ``samples`` entry, if any, goes to ``samples.jsonl``, not metrics.
        Called under the runtime's precision context, as :meth:`evaluate_client` is."""

    #: keys of :meth:`evaluate`'s metrics computed on the clients' own data (their label or
    #: category mix, their held-out split): not part of a central-DP release
    client_metric_keys: tuple[str, ...] = ()

    def evaluate_client(self, ctx) -> dict[str, Any]:
        """Metrics of one client's own model (already loaded), computed on the client: the
        shared test set and the client's own split (``ctx.test_data`` / ``ctx.local_test``).
        Needed only by personalised strategies (``Strategy.personalized``)."""
        raise NotImplementedError(f"task '{self.name}' has no per-client evaluation")

    def merge_client_evals(self, metrics: dict[str, Any], evals: list[dict[str, Any] | None]
                           ) -> dict[str, Any]:
        """The round's metrics of a personalised run: the server's ``metrics`` (of the shared
        state) combined with every client's :meth:`evaluate_client` (None: no answer)."""
        raise NotImplementedError(f"task '{self.name}' has no per-client evaluation")

    @abstractmethod
    def summary(self, initial: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
        """Task-specific entries of ``summary.json`` (start, final and best figures)."""

    @staticmethod
    @abstractmethod
    def summary_lines(summary: dict[str, Any]) -> list[str]:
        """The console summary's metric line(s)."""

    def describe(self, runtime: ModelRuntime) -> dict[str, Any]:
        """Extra entries for the exported adapter's ``lora_a2.json``."""
        return {}
