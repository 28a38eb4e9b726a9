"""Typed run configuration: TOML file + ``--set key=value`` overrides, validated with clear errors.

Every key is documented in the field's docstring-comment below and in docs/CONFIGURATION.md's
reference. Unknown keys and bad values raise :class:`~lora_a2.errors.UserError` with a one-line
message naming the key (and the nearest valid key for a typo).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import tomli_w

from .errors import UserError

MODEL_DTYPES = ("float32", "bfloat16", "float16", "auto")
RANK_DISTRIBUTIONS = ("uniform", "heavy-tail", "normal")
"""Named values of strategy.rank_budget (the same tuple as budgets.DISTRIBUTIONS, kept here so
that the config imports no component)."""
MECHANISMS = ("none", "gaussian", "laplace")
"""Values of privacy.mechanism."""
MODES = ("local", "central")
"""Values of privacy.mode."""
REPORTERS = ("tensorboard", "mlflow")
"""Values of report.to (the optional reporters of lora_a2.reporters)."""
NOISE_SOURCES = ("os", "seeded")
"""Values of privacy.noise_source: `os` = every draw read from the operating system's CSPRNG
(no seed; the default: nobody can rebuild the noise); `seeded` = derived from the run seed
(exact resume and engine-equivalence tests, but anyone who holds the config can rebuild it)."""


@dataclass
class ModelConfig:
    name: str = "minilm"
    """Classification: `minilm` (offline all-MiniLM-L6-v2), `tiny-random-bert`; causal LM:
    `smollm2` (offline SmolLM2-135M-Instruct), `tiny-random-llama`; or a hub name, a local
    folder, or a local `.gguf` file."""
    max_length: int = 64
    """Tokens per example (truncation and padding). Causal LM: prompt + response; a longer
    example has its input shortened, or is skipped (counted) when even that cannot fit."""
    head: str = "frozen"
    """Classifier head: `frozen` (the paper; seeded random init, never sent) or `trained`."""
    target_modules: list[str] = field(default_factory=list)
    """Linear layers that get LoRA; empty = every linear layer of every encoder block."""
    lora_alpha: float = 16.0
    """LoRA scaling numerator: ΔW = (lora_alpha / rank) · B A."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA input (not stated in the paper)."""
    init_std: float = 0.0
    """Std of A's Gaussian init; 0 = 1/sqrt(3·d_in) (the variance of PEFT's default init)."""
    dtype: str = "float32"
    """Dtype of the base weights: `float32` (whatever the checkpoint stores), `bfloat16`,
    `float16`, or `auto` (the checkpoint's own, transformers 5's default). The LoRA factors stay
    float32 (PEFT casts adapters up), so do uploads."""
    gradient_checkpointing: bool = False
    """Recompute each block's activations in the backward pass instead of keeping them: less
    memory for longer sequences and bigger models, at about one extra forward pass of time."""


@dataclass
class DataConfig:
    name: str = "bbc-news"
    """`bbc-news`, `rotten-tomatoes`, `twitter-sentiment`, `csv:PATH`, `json:PATH`,
    `parquet:PATH` (or `csv:TRAIN,TEST`), `hf:NAME[:CONFIG]`."""
    text_column: str = ""
    """Text column for file/hub datasets; empty = `text`."""
    label_column: str = ""
    """Label column for file/hub datasets; empty = `label`."""
    num_clients: int = 10
    """K: the number of clients the training set is partitioned into."""
    partition: str = "dirichlet"
    """`dirichlet`, `pathological`, `paired`, `iid`."""
    alpha: float = 0.1
    """Dirichlet concentration (smaller = more heterogeneous)."""
    classes_per_client: int = 2
    """Classes per client for `pathological` / `paired`."""
    min_examples_per_client: int = 8
    """Every client gets at least this many training examples (topped up from the largest)."""
    test_fraction: float = 0.2
    """Held-out fraction when the source has no test split (stratified, seeded)."""
    max_train_examples: int = 1000
    """Cap on training examples (stratified subsample); 0 = all. The default 1000 sizes the
    embedded demo for about 7 minutes on 2 CPU cores; set 0 for the whole dataset."""
    max_test_examples: int = 0
    """Cap on test examples; 0 = all."""
    local_test_fraction: float = 0.0
    """If > 0, each client holds out this fraction of its data to report per-client accuracy."""
    instruction_column: str = ""
    """Causal LM, file/hub data: the instruction (prompt) column; empty = `instruction`."""
    input_column: str = ""
    """Causal LM: optional context column appended to the instruction; empty = `input` when the
    data has it, else none."""
    response_column: str = ""
    """Causal LM: the reference answer column; empty = `response` (setting it on file data
    selects the causal-lm task)."""
    category_column: str = ""
    """Causal LM: the category the non-IID split is made over; empty = `category` when the data
    has it, else one category for all rows."""


@dataclass
class TaskConfig:
    name: str = "auto"
    """`classification` (encoder + classifier head), `causal-lm` (instruction tuning of a
    decoder), or `auto`: the task the model or data belongs to (classification otherwise)."""
    generate_examples: int = 32
    """Causal LM: held-out examples answered by greedy decoding each round for ROUGE-L and
    exact match (a fixed, seeded subset of the test set); 0 = no generation metric."""
    max_new_tokens: int = 32
    """Causal LM: tokens generated per answer at most."""
    samples: int = 3
    """Causal LM: sample generations written to samples.jsonl per round."""


@dataclass
class StrategyConfig:
    name: str = "lora-a2"
    """`lora-a2`, `fl-lora`, `ffa-lora`, `flexlora`, `hetlora`, `flora`, `rolora`,
    `fedsa-lora`, `fedex-lora`, `fedsvd`, `fedavg-full`, or a plugin's (see
    `lora-a2 strategies`)."""
    global_rank: int = 8
    """r_G: rank of the global adapter (LoRA-A2) and the upper bound of every rank budget; the
    single-rank baselines take their rank from `rank_budget`, the heterogeneous-rank ones use
    the largest budget."""
    rank_budget: Any = 2
    """Per-client rank budget r_k: an int (all clients), a list of one int per client, or a
    distribution over {1, 2, 4, 8, 16} ≤ global_rank drawn from the seed: `uniform`,
    `heavy-tail` (most clients small), `normal` (most in the middle); see `lora_a2.budgets`."""
    lr: float = 5e-4
    """Learning rate of A (lr_A). AdamW."""
    lr_ratio: float = 0.0
    """lr_B = lr_ratio · lr_A. 0 (default) = the strategy's own paper rule: 5 for LoRA-A2 (the
    LoRA-A2 paper's LoRA+-style ratio), 1 (one learning rate) for every baseline whose paper
    trains A and B at one rate; see `lora-a2 strategies`. Any value > 0 overrides it."""
    head_lr: float = 0.0
    """Learning rate of a trained head; 0 = lr_B."""
    full_lr: float = 5e-5
    """Learning rate for `fedavg-full` (all weights)."""
    weight_decay: float = 0.01
    """AdamW weight decay (never moves a frozen or unselected entry)."""
    options: dict[str, Any] = field(default_factory=dict)
    """The strategy's own knobs (`[strategy.options]` table, or `--set
    strategy.options.NAME=VALUE`): each strategy declares its typed options (`lora-a2
    strategies` lists them; docs/CONFIGURATION.md § Strategy options). A resolved config holds
    every option of its strategy. The older short form `strategy.NAME` still loads for the
    options built-in strategies had before (`LEGACY_STRATEGY_OPTIONS`)."""


@dataclass
class TrainConfig:
    rounds: int = 8
    """T: federated rounds (LoRA-A2 alternates: odd rounds train B, even rounds A)."""
    local_epochs: int = 1
    """E: local epochs of training per round on each client (LoRA-A2's probe comes on top)."""
    batch_size: int = 16
    """Examples per local training step."""
    eval_batch_size: int = 64
    """Examples per evaluation forward pass (no effect on results)."""
    clients_per_round: float = 0
    """Clients sampled per round: 0 = all, an int ≥ 1 = that many, a float in (0, 1) = fraction."""
    max_grad_norm: float = 0.0
    """Gradient clipping per step; 0 = off."""
    dropout: float = 0.0
    """Simulated failures: probability that a sampled client receives its task but never replies."""
    min_replies: int = 1
    """A round with fewer valid replies fails: recorded, and the global state stays unchanged."""


@dataclass
class ServerConfig:
    max_update_bytes: int = 2 * 1024**3
    """Uploads larger than this are rejected unread."""
    max_update_norm: float = 0.0
    """Reject an upload whose values have a larger L2 norm; 0 = no bound."""


@dataclass
class EngineConfig:
    name: str = "local"
    """`local` (one process simulates every client) or `flower` (Flower's Simulation Engine;
    the Deployment Engine runs the app in `flower_app/`)."""
    device: str = "auto"
    """`auto` (CUDA when present), `cpu`, `cuda`, `cuda:N`."""
    threads: int = 0
    """torch CPU threads; 0 = torch's default."""
    num_workers: int = 0
    """flower: ClientApp worker processes (Ray actors); 0 = min(CPU cores, clients per round)."""
    round_timeout_s: float = 3600.0
    """flower: a node that has not replied this many seconds after the round's messages were
    sent is dropped for the round; 0 = wait for every reply."""
    connect_timeout_s: float = 60.0
    """flower: before round 1, wait up to this long for a node per client (deployment)."""


@dataclass
class PrivacyConfig:
    mechanism: str = "none"
    """Client-level DP on uploads: `none`, `gaussian` (L2 clip) or `laplace` (L1 clip, pure ε
    per round); see docs/PRIVACY.md."""
    mode: str = "local"
    """`local` (each client noises its upload; untrusted server) or `central` (clients clip, the
    trusted server noises the aggregate; strategies with a linear aggregate only)."""
    clip: float = 1.0
    """Bound C on the norm of each client's transmitted change (L2; L1 for `laplace`)."""
    noise_multiplier: float | None = None
    """z: noise std (Laplace: scale) = z · clip. Give this or `privacy.epsilon`, not both."""
    epsilon: float | None = None
    """Target ε over `train.rounds`; the noise multiplier is calibrated to reach it."""
    delta: float = 1e-5
    """δ of the reported (ε, δ); should be well below 1 / data.num_clients."""
    selection: str = "public"
    """LoRA-A2's slot selection: `public` (the paper: each client's top r_k·N slot ids are
    sent in the clear, chosen from its private data — not covered by ε) or `private` (an
    ε-DP top-k, `privacy.selection_epsilon` per client and round, composed into ε)."""
    selection_epsilon: float = 1.0
    """`private` selection: ε of one client's whole top-k selection in one round (pure DP; the
    one-shot Gumbel mechanism, see `lora_a2.selection.private_top_k`)."""
    noise_source: str = "os"
    """Where every noise draw (local, central, private selection) comes from: `os` (read from
    the OS CSPRNG for each draw, no seed; nobody can rebuild the noise) or `seeded` (from the
    run seed: exact resume and engine-equivalence tests, but whoever holds the config can
    rebuild and subtract the noise, so the guarantee does not hold against them). Configs
    without `schema_version` (written before version 2) load with `seeded`."""
    release_client_stats: bool = False
    """Central mode: also publish per-client, data-dependent values in metrics.jsonl and
    summary.json (training losses, LoRA-A2's rank allocation, per-client upload sizes, a
    personalised method's client evaluations). They are not noised: the summary then says the
    guarantee does not cover them. Off: they go to the server's own record, server_log.jsonl."""
    weight_cap: float = 0.0
    """Central mode: DP-FedAvg's weight cap ŵ (client weight = min(n_k / ŵ, 1), divided by
    the expected total weight). 0 = the largest client's example count (the data weights in
    expectation); a smaller cap lowers the sensitivity, weighting large clients less."""


@dataclass
class SecAggConfig:
    enabled: bool = False
    """Secure aggregation with Flower's SecAgg+ (engine.name = "flower" only): the server learns
    only the sum of the clients' (dense, quantised) updates; see docs/PRIVACY.md."""
    num_shares: float = 1.0
    """SecAgg+ shares per client: an int ≥ 2, or a fraction (0, 1] of the round's clients."""
    reconstruction_threshold: float = 0.5
    """Shares needed to unmask: an int ≥ 2 (≤ num_shares), or a fraction of num_shares. A
    round survives dropouts as long as every client keeps this many live neighbours."""
    clipping_range: float = 8.0
    """Each entry of a client's secured vector must lie in [−c, c] (SecAgg+ clips silently;
    the client clips first and logs how many entries it clipped)."""
    quantization_range: int = 4194304
    """Q: entries are quantised to Q levels over [−c, c] (step 2c/Q) before masking."""
    modulus_range: int = 4294967296
    """M: masked vectors live in Z_M; needs clients_per_round · Q < M."""
    timeout_s: float = 0.0
    """Seconds to wait for the replies of each SecAgg+ stage; 0 = engine.round_timeout_s."""


@dataclass
class ReportConfig:
    to: list[str] = field(default_factory=list)
    """Reporters of every round's released metrics besides metrics.jsonl, the plots and the
    console (HF Trainer's `report_to`): `tensorboard` (event files under `DIR/tensorboard/`;
    `pip install 'lora-a2[tensorboard]'`) and `mlflow` (an MLflow run, by default in
    `sqlite:///DIR/mlflow.db`; `pip install 'lora-a2[mlflow]'`). Default: neither."""
    mlflow_tracking_uri: str = ""
    """`mlflow`: the tracking store; empty = `sqlite:///DIR/mlflow.db` inside the run folder."""
    mlflow_experiment: str = "lora-a2"
    """`mlflow`: the experiment the run is logged under."""


#: options of built-in strategies that were keys of the ``strategy`` table before the typed
#: per-strategy options: ``strategy.NAME`` still loads, as ``strategy.options.NAME`` (a resolved
#: config of that time lists all of them, for every strategy, at the defaults shown here; the
#: strategies drop an option their method has not got while it holds such a default).
LEGACY_STRATEGY_OPTIONS: dict[str, Any] = {
    "probe_epochs": 1, "probe_fraction": 1.0, "probe": "full", "probe_batches": 4,
    "probe_optimizer": "fresh", "reselect_every": 1, "slot_score": "frobenius",
    "renormalize": False, "prune_gamma": 0.99, "prune_lambda": 1e-3,
    "hetlora_weights": "module"}

#: the config schema this code writes. 1 = configs written before ``schema_version`` existed
#: (they load with the behaviour they ran with: ``privacy.noise_source = "seeded"``).
SCHEMA_VERSION = 2
#: defaults that differ for an older schema, applied before the file's own keys
LEGACY_DEFAULTS: dict[int, dict[str, Any]] = {1: {"privacy.noise_source": "seeded"}}


@dataclass
class Config:
    schema_version: int = SCHEMA_VERSION
    """Config schema (2 = this release). A config file without it is version 1: it loads
    with the defaults it was written under (see `privacy.noise_source`)."""
    seed: int = 0
    """Seeds the data split, the partition, the model's random init, each client's training and
    the client sampling (and every noise draw under `privacy.noise_source = "seeded"`)."""
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    report: ReportConfig = field(default_factory=ReportConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        return tomli_w.dumps(_drop_none(self.to_dict()))


SECTIONS: dict[str, type] = {
    "task": TaskConfig,
    "model": ModelConfig,
    "data": DataConfig,
    "strategy": StrategyConfig,
    "train": TrainConfig,
    "engine": EngineConfig,
    "server": ServerConfig,
    "privacy": PrivacyConfig,
    "secagg": SecAggConfig,
    "report": ReportConfig,
}

PARTITIONS = ("dirichlet", "pathological", "paired", "iid")


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (_drop_none(v) if isinstance(v, dict) else v) for k, v in d.items() if v is not None}


def all_keys() -> list[str]:
    """Every valid dotted key, for error messages and docs/CONFIGURATION.md."""
    keys = ["schema_version", "seed"]
    for sec, cls in SECTIONS.items():
        keys += [f"{sec}.{f.name}" for f in fields(cls)]
    return keys


def _unknown(key: str) -> UserError:
    known = all_keys() + [f"strategy.{k}" for k in LEGACY_STRATEGY_OPTIONS]
    near = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    hint = f" (did you mean '{near[0]}'?)" if near else ""
    return UserError(f"unknown config key '{key}'{hint}")


def coerce_value(key: str, value: Any, annot: Any) -> Any:
    """Check a value's type against the field annotation; ints are accepted for floats."""
    if annot is Any:
        return value
    if annot is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"config key '{key}' must be true or false, got {value!r}")
    if annot is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise UserError(f"config key '{key}' must be an integer, got {value!r}")
    if annot is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value if isinstance(value, int) and key == "train.clients_per_round" else float(value)
        raise UserError(f"config key '{key}' must be a number, got {value!r}")
    if annot is str:
        if isinstance(value, str):
            return value
        raise UserError(f"config key '{key}' must be a string, got {value!r}")
    if get_origin(annot) is list:
        (item,) = get_args(annot)
        if not isinstance(value, list):
            raise UserError(f"config key '{key}' must be a list, got {value!r}")
        return [coerce_value(key, v, item) for v in value]
    return value


def _apply(cfg: Config, key: str, value: Any) -> None:
    parts = key.split(".")
    if parts[:2] == ["strategy", "options"]:
        if len(parts) == 2:
            if not isinstance(value, dict):
                raise UserError(f"config key 'strategy.options' must be a table, got {value!r}")
            cfg.strategy.options.update(value)  # beside short-form keys read before it
        elif len(parts) == 3 and parts[2]:
            cfg.strategy.options[parts[2]] = value
        else:
            raise _unknown(key)
        return
    if parts[0] == "strategy" and len(parts) == 2 and parts[1] in LEGACY_STRATEGY_OPTIONS:
        cfg.strategy.options[parts[1]] = value  # the short form of a built-in's option
        return
    if parts == ["seed"]:
        cfg.seed = coerce_value(key, value, int)
        return
    if parts == ["schema_version"]:
        version = coerce_value(key, value, int)
        _require(1 <= version <= SCHEMA_VERSION, key, f"must be 1 … {SCHEMA_VERSION}", value)
        cfg.schema_version = version
        for k, v in LEGACY_DEFAULTS.get(version, {}).items():
            _apply(cfg, k, v)
        return
    if len(parts) != 2 or parts[0] not in SECTIONS:
        raise _unknown(key)
    sec, name = parts
    obj = getattr(cfg, sec)
    hints = get_type_hints(type(obj))
    if name not in hints:
        raise _unknown(key)
    setattr(obj, name, coerce_value(key, value, hints[name]))


def _flatten(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and not prefix and k in SECTIONS:
            out += _flatten(v, key + ".")
        elif isinstance(v, dict) and key == "strategy.options":
            out.append((key, v))
        elif isinstance(v, dict):
            raise _unknown(key)
        else:
            out.append((key, v))
    return out


def parse_set(item: str) -> tuple[str, Any]:
    """Parse one ``--set key=value``; the value is a TOML literal, else a bare string."""
    if "=" not in item:
        raise UserError(f"--set expects key=value, got '{item}'")
    key, raw = item.split("=", 1)
    key, raw = key.strip(), raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


_PAIR = re.compile(r"^[A-Za-z_][\w.]*=")


def split_sets(items: str | list[str]) -> list[str]:
    """``key=value`` items; one item holding several space-separated pairs (``"a=1 b=2"``, as
    flwr's ``--run-config``) is split, but only when every piece is itself ``key=...`` — so a
    value with spaces (``strategy.rank_budget=[1, 2]``, ``data.name=csv:my file.csv``) is not."""
    out: list[str] = []
    for item in [items] if isinstance(items, str) else items:
        parts = item.split()
        if len(parts) > 1 and all(_PAIR.match(p) for p in parts):
            out += parts
        else:
            out.append(item.strip())
    return [o for o in out if o]


def overrides_to_sets(overrides: Any) -> list[str | tuple[str, Any]]:
    """Overrides as :func:`load_config` takes them, from a dict of dotted keys (or nested
    tables), a list of ``key=value`` strings, or one string of space-separated pairs."""
    if overrides is None:
        return []
    if isinstance(overrides, dict):
        return [(k, v) for k, v in _flatten(overrides) if v is not None]
    if isinstance(overrides, (str, list, tuple)):
        return list(split_sets(list(overrides) if not isinstance(overrides, str) else overrides))
    raise UserError(f"overrides must be a dict, a list of 'key=value' strings or one string, "
                    f"got {type(overrides).__name__}")


def config_from_dict(data: dict[str, Any], overrides: list[str | tuple[str, Any]] | None = None
                     ) -> Config:
    """A validated config from a nested dict (``Config.to_dict()``) plus overrides."""
    cfg = Config()
    items = [(k, v) for k, v in _flatten(data) if v is not None]
    # a file's schema version (1 when it has none) first: it sets that version's defaults,
    # which the file's own keys then override
    version = next((v for k, v in items if k == "schema_version"), 1 if items else None)
    if version is not None:
        _apply(cfg, "schema_version", version)
    for key, value in items:
        if key != "schema_version":
            _apply(cfg, key, value)
    for item in overrides or []:
        key, value = item if isinstance(item, tuple) else parse_set(item)
        _apply(cfg, key, value)
    validate(cfg)
    return cfg


def load_config(path: str | Path | None = None,
                overrides: list[str | tuple[str, Any]] | None = None) -> Config:
    """Build a validated :class:`Config` from defaults, an optional TOML file and overrides
    (``key=value`` strings as ``--set`` takes them, or ``(key, value)`` pairs)."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file '{p}' does not exist")
        try:
            data = tomllib.loads(p.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"config file '{p}' is not valid TOML: {str(e).splitlines()[0]}") from None
    return config_from_dict(data, overrides)


def _require(cond: bool, key: str, msg: str, value: Any) -> None:
    if not cond:
        raise UserError(f"config key '{key}' {msg}, got {value!r}")


def validate(cfg: Config) -> None:
    """Range and consistency checks; each failure is a one-line :class:`UserError`."""
    m, d, s, t, e = cfg.model, cfg.data, cfg.strategy, cfg.train, cfg.engine
    _require(cfg.seed >= 0, "seed", "must be ≥ 0", cfg.seed)
    _require(m.max_length >= 8, "model.max_length", "must be ≥ 8", m.max_length)
    _require(m.head in ("frozen", "trained"), "model.head", "must be 'frozen' or 'trained'", m.head)
    _require(m.lora_alpha > 0, "model.lora_alpha", "must be > 0", m.lora_alpha)
    _require(0 <= m.lora_dropout < 1, "model.lora_dropout", "must be in [0, 1)", m.lora_dropout)
    _require(m.init_std >= 0, "model.init_std", "must be ≥ 0", m.init_std)
    _require(m.dtype in MODEL_DTYPES, "model.dtype", f"must be one of {', '.join(MODEL_DTYPES)}",
             m.dtype)
    _require(d.num_clients >= 1, "data.num_clients", "must be ≥ 1", d.num_clients)
    _require(d.partition in PARTITIONS, "data.partition", f"must be one of {', '.join(PARTITIONS)}",
             d.partition)
    _require(d.alpha > 0, "data.alpha", "must be > 0", d.alpha)
    _require(d.classes_per_client >= 1, "data.classes_per_client", "must be ≥ 1", d.classes_per_client)
    _require(d.min_examples_per_client >= 1, "data.min_examples_per_client", "must be ≥ 1",
             d.min_examples_per_client)
    _require(0 < d.test_fraction < 1, "data.test_fraction", "must be in (0, 1)", d.test_fraction)
    _require(d.max_train_examples >= 0, "data.max_train_examples", "must be ≥ 0 (0 = all)",
             d.max_train_examples)
    _require(d.max_test_examples >= 0, "data.max_test_examples", "must be ≥ 0 (0 = all)",
             d.max_test_examples)
    _require(0 <= d.local_test_fraction < 1, "data.local_test_fraction", "must be in [0, 1)",
             d.local_test_fraction)
    _require(s.global_rank >= 1, "strategy.global_rank", "must be ≥ 1", s.global_rank)
    rb = s.rank_budget
    if isinstance(rb, list):
        _require(len(rb) == d.num_clients, "strategy.rank_budget",
                 f"must list one budget per client ({d.num_clients})", rb)
        for b in rb:
            _require(isinstance(b, int) and not isinstance(b, bool) and 1 <= b <= s.global_rank,
                     "strategy.rank_budget", f"entries must be integers in [1, {s.global_rank}]", b)
    elif isinstance(rb, str):
        _require(rb in RANK_DISTRIBUTIONS, "strategy.rank_budget",
                 f"must be an integer, a list, or one of {', '.join(RANK_DISTRIBUTIONS)}", rb)
    else:
        _require(isinstance(rb, int) and not isinstance(rb, bool), "strategy.rank_budget",
                 "must be an integer, a list of integers, or a distribution name", rb)
        _require(1 <= rb <= s.global_rank, "strategy.rank_budget",
                 f"must be in [1, strategy.global_rank = {s.global_rank}]", rb)
    for key, v in (("strategy.lr", s.lr), ("strategy.full_lr", s.full_lr)):
        _require(v > 0, key, "must be > 0", v)
    _require(s.lr_ratio >= 0, "strategy.lr_ratio", "must be ≥ 0 (0 = the strategy's paper rule)",
             s.lr_ratio)
    _require(s.head_lr >= 0, "strategy.head_lr", "must be ≥ 0 (0 = lr_B)", s.head_lr)
    _require(s.weight_decay >= 0, "strategy.weight_decay", "must be ≥ 0", s.weight_decay)
    _require(t.rounds >= 1, "train.rounds", "must be ≥ 1", t.rounds)
    _require(t.local_epochs >= 1, "train.local_epochs", "must be ≥ 1", t.local_epochs)
    _require(t.batch_size >= 1, "train.batch_size", "must be ≥ 1", t.batch_size)
    _require(t.eval_batch_size >= 1, "train.eval_batch_size", "must be ≥ 1", t.eval_batch_size)
    _require(t.max_grad_norm >= 0, "train.max_grad_norm", "must be ≥ 0", t.max_grad_norm)
    _require(0 <= t.dropout < 1, "train.dropout", "must be in [0, 1)", t.dropout)
    _require(t.min_replies >= 1, "train.min_replies", "must be ≥ 1", t.min_replies)
    _require(cfg.server.max_update_bytes >= 1024, "server.max_update_bytes", "must be ≥ 1024",
             cfg.server.max_update_bytes)
    _require(cfg.server.max_update_norm >= 0, "server.max_update_norm", "must be ≥ 0 (0 = off)",
             cfg.server.max_update_norm)
    cpr = t.clients_per_round
    if isinstance(cpr, float) and not cpr.is_integer():
        _require(0 < cpr < 1, "train.clients_per_round",
                 "must be 0 (all), an integer count, or a fraction in (0, 1)", cpr)
    else:
        _require(0 <= cpr <= d.num_clients, "train.clients_per_round",
                 f"must be 0 (all) or a count ≤ data.num_clients = {d.num_clients}", cpr)
    _require(t.min_replies <= clients_per_round(cfg), "train.min_replies",
             f"must not exceed the clients sampled per round ({clients_per_round(cfg)})",
             t.min_replies)
    _require(e.name in ("local", "flower"), "engine.name", "must be 'local' or 'flower'", e.name)
    _require(e.num_workers >= 0, "engine.num_workers", "must be ≥ 0 (0 = auto)", e.num_workers)
    _require(e.round_timeout_s >= 0, "engine.round_timeout_s", "must be ≥ 0 (0 = no limit)",
             e.round_timeout_s)
    _require(e.connect_timeout_s >= 0, "engine.connect_timeout_s", "must be ≥ 0",
             e.connect_timeout_s)
    _require(e.device == "auto" or e.device == "cpu" or e.device.startswith("cuda"),
             "engine.device", "must be 'auto', 'cpu' or 'cuda[:N]'", e.device)
    _require(e.threads >= 0, "engine.threads", "must be ≥ 0", e.threads)
    for name in cfg.report.to:
        _require(name in REPORTERS, "report.to", f"entries must be among {', '.join(REPORTERS)}",
                 name)
    _require(len(set(cfg.report.to)) == len(cfg.report.to), "report.to",
             "names a reporter twice", cfg.report.to)
    _require(bool(cfg.report.mlflow_experiment), "report.mlflow_experiment", "must not be empty",
             cfg.report.mlflow_experiment)
    _validate_privacy(cfg)
    _validate_secagg(cfg)
    _validate_task(cfg)


def _validate_task(cfg: Config) -> None:
    t = cfg.task
    _require(t.generate_examples >= 0, "task.generate_examples", "must be ≥ 0",
             t.generate_examples)
    _require(t.max_new_tokens >= 1, "task.max_new_tokens", "must be ≥ 1", t.max_new_tokens)
    _require(t.samples >= 0, "task.samples", "must be ≥ 0", t.samples)


def _validate_privacy(cfg: Config) -> None:
    p = cfg.privacy
    _require(p.mechanism in MECHANISMS, "privacy.mechanism", f"must be one of {', '.join(MECHANISMS)}",
             p.mechanism)
    _require(p.mode in MODES, "privacy.mode", "must be 'local' or 'central'", p.mode)
    _require(p.clip > 0, "privacy.clip", "must be > 0", p.clip)
    _require(0 < p.delta < 1, "privacy.delta", "must be in (0, 1)", p.delta)
    for key, v in (("privacy.noise_multiplier", p.noise_multiplier), ("privacy.epsilon", p.epsilon)):
        if v is not None:
            _require(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0, key,
                     "must be a number > 0", v)
    _require(p.noise_source in NOISE_SOURCES, "privacy.noise_source",
             f"must be one of {', '.join(NOISE_SOURCES)}", p.noise_source)
    _require(p.weight_cap >= 0, "privacy.weight_cap", "must be ≥ 0", p.weight_cap)
    _require(p.selection in ("public", "private"), "privacy.selection",
             "must be 'public' or 'private'", p.selection)
    _require(isinstance(p.selection_epsilon, (int, float)) and p.selection_epsilon > 0,
             "privacy.selection_epsilon", "must be a number > 0", p.selection_epsilon)
    if p.selection == "private":
        _require(p.mechanism != "none", "privacy.selection",
                 "'private' needs DP on the uploads too (set privacy.mechanism); a private "
                 "selection of a non-private update protects nothing", p.selection)
        _require(p.mode == "local", "privacy.selection",
                 "'private' is for local mode: in central mode the slot ids reach only the "
                 "trusted server and the release is noised on every slot", p.selection)
    if p.mechanism == "none":
        return
    if (p.noise_multiplier is None) == (p.epsilon is None):
        raise UserError("config keys 'privacy.noise_multiplier' and 'privacy.epsilon': give exactly "
                        f"one of them with privacy.mechanism = '{p.mechanism}'")


def _validate_secagg(cfg: Config) -> None:
    a = cfg.secagg
    if not a.enabled:
        return
    _require(cfg.engine.name == "flower", "secagg.enabled",
             "SecAgg+ needs engine.name = 'flower' (the local engine has no network to hide "
             "uploads from)", a.enabled)
    _require(not (cfg.privacy.mechanism != "none" and cfg.privacy.mode == "central"),
             "secagg.enabled", "cannot be combined with central DP: the server never sees an "
             "upload to clip; use privacy.mode = 'local' (distributed noise)", a.enabled)
    n = clients_per_round(cfg)
    _require(n >= 2, "secagg.enabled", "needs at least 2 clients per round", a.enabled)
    shares = a.num_shares if a.num_shares > 1 else max(1, round(a.num_shares * n))
    _require(a.num_shares > 0 and (a.num_shares <= 1 or float(a.num_shares).is_integer()),
             "secagg.num_shares", "must be an integer ≥ 2 or a fraction in (0, 1]", a.num_shares)
    _require(shares <= n, "secagg.num_shares",
             f"must not exceed the clients per round ({n})", a.num_shares)
    t = a.reconstruction_threshold
    _require(t > 0 and (t <= 1 or float(t).is_integer()), "secagg.reconstruction_threshold",
             "must be an integer ≥ 2 or a fraction in (0, 1]", t)
    _require(t <= 1 or t <= min(shares, n), "secagg.reconstruction_threshold",
             f"must not exceed the shares per client ({shares}) or the clients per round ({n})",
             t)
    _require(a.clipping_range > 0, "secagg.clipping_range", "must be > 0", a.clipping_range)
    _require(a.quantization_range >= 2, "secagg.quantization_range", "must be ≥ 2",
             a.quantization_range)
    _require(n * a.quantization_range < a.modulus_range, "secagg.modulus_range",
             f"must exceed clients per round × quantization_range ({n * a.quantization_range})"
             f" or the masked sum wraps around", a.modulus_range)
    _require(a.timeout_s >= 0, "secagg.timeout_s", "must be ≥ 0", a.timeout_s)


def clients_per_round(cfg: Config) -> int:
    """Resolved number of clients sampled each round."""
    cpr, k = cfg.train.clients_per_round, cfg.data.num_clients
    if cpr == 0:
        return k
    if isinstance(cpr, float) and not cpr.is_integer():
        return max(1, round(cpr * k))
    return int(cpr)
