"""The config schema: one dataclass per section, each key documented by the docstring below it
(docs/CONFIGURATION.md is generated from these), and the named values keys may take."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import tomli_w

MODEL_DTYPES = ("float32", "bfloat16", "float16", "auto")
PRECISIONS = ("fp32", "bf16-mixed")
"""Values of train.precision (Lightning's names)."""
BF16_MATMULS = ("auto", "bf16", "fp32")
"""Values of train.bf16_matmul."""
RANK_DISTRIBUTIONS = ("uniform", "heavy-tail", "normal")
"""Named values of strategy.rank_budget (the same tuple as budgets.DISTRIBUTIONS, kept here so
that the config imports no component)."""
MECHANISMS = ("none", "gaussian", "laplace")
"""Values of privacy.mechanism."""
MODES = ("local", "central")
"""Values of privacy.mode."""
REPORTERS = ("tensorboard", "mlflow")
"""Values of report.to (the optional reporters of lora_a2.reporters)."""
PARTITIONS = ("dirichlet", "pathological", "paired", "iid", "natural")
"""Values of data.partition."""
FLEET_PROFILES = ("none", "mobile", "mixed", "uniform")
"""Values of fleet.profile besides `csv:PATH` (the built-in fleets of lora_a2.fleet.PROFILES,
kept here so that the config imports no component)."""
TRAIN_MODES = ("sync", "async")
"""Values of train.mode."""
CROSS_PHASE = ("drop", "apply")
"""Values of train.cross_phase."""
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
    """Tokens per example (truncation and padding), ≥ 8 and at most the model's learned position
    table (512 for MiniLM). Causal LM: prompt + response; a longer example has its input
    shortened, or is skipped (counted) when even that cannot fit."""
    head: str = "frozen"
    """Classifier head: `frozen` (the paper; seeded random init, never sent) or `trained`."""
    target_modules: list[str] = field(default_factory=list)
    """Linear layers that get LoRA; empty = every linear layer of every encoder block."""
    lora_alpha: float = 16.0
    """LoRA scaling numerator: ΔW = (lora_alpha / rank) · B A. FLoRA fixes its own (α_k = 2 r_k)
    and refuses another value."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA input (not stated in the paper)."""
    init_std: float = 0.0
    """Std of A's Gaussian init; 0 = 1/sqrt(3·d_in) (the variance of PEFT's default init)."""
    dtype: str = "float32"
    """Dtype the base weights are *stored* in: `float32` (whatever the checkpoint stores),
    `bfloat16`, `float16`, or `auto` (the checkpoint's own, transformers 5's default). Memory,
    not arithmetic: `train.precision` says what the matrix products compute in (a bfloat16
    base computes in bfloat16 whatever it says). The LoRA factors stay float32 (PEFT casts
    adapters up), so do uploads."""
    gradient_checkpointing: bool = False
    """Recompute each block's activations in the backward pass instead of keeping them: less
    memory for longer sequences and bigger models, at about one extra forward pass of time."""


@dataclass
class DataConfig:
    name: str = "bbc-news"
    """`bbc-news`, `rotten-tomatoes`, `twitter-sentiment`, `csv:PATH`, `json:PATH`,
    `parquet:PATH` (or `csv:TRAIN,TEST`), `hf:NAME[:CONFIG]`; causal LM: `bbc-headlines`,
    `chatterbot`, `debate-replies`."""
    text_column: str = ""
    """Text column for file/hub datasets; empty = `text`."""
    label_column: str = ""
    """Label column for file/hub datasets; empty = `label`."""
    num_clients: int = 10
    """K: the number of clients the training set is partitioned into. With `partition =
    "natural"`: 0 = every natural client, a positive value = the largest that many (an error
    when fewer remain)."""
    partition: str = "dirichlet"
    """`dirichlet`, `pathological`, `paired`, `iid`, or `natural`: one client per distinct
    value of `data.client_column` (clients indexed in the sorted order of those values)."""
    client_column: str = ""
    """`natural` partition: the column whose values are the clients (a user, a film, a
    speaker); empty = the built-in dataset's own (`rotten-tomatoes`: `movie_name`,
    `debate-replies`: `speaker`). Setting it with another partition is an error."""
    alpha: float = 0.1
    """Dirichlet concentration (smaller = more heterogeneous)."""
    classes_per_client: int = 2
    """Classes per client for `pathological` / `paired`."""
    min_examples_per_client: int = 8
    """Every client gets at least this many training examples (topped up from the largest);
    `natural`: a client with fewer is dropped (counted in `data_rows`), never topped up."""
    test_fraction: float = 0.2
    """Held-out fraction when the source has no test split (stratified, seeded)."""
    max_train_examples: int = 1000
    """Cap on training examples (stratified subsample); 0 = all. The default 1000 sizes the
    embedded demo for about 7 to 11 minutes on 2 CPU cores (6 min 46 s and 10 min 42 s measured
    on two machines, README); set 0 for the whole dataset. `natural`: keeps whole clients, largest first, as
    many as fit under the cap (never a row sample)."""
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
    `heavy-tail` (most clients small), `normal` (most in the middle); see `lora_a2.budgets`.
    `auto` (needs a `fleet.profile` and `train.deadline_s`): each round, each client gets the
    largest r_k ≤ global_rank whose upload still fits in what the deadline leaves after its
    download and compute, on its own link and device (docs/FLEETS.md). Baselines that train
    one rank on every client (fl-lora, ffa-lora, rolora, fedsa-lora, fedex-lora, fedsvd) take
    a single value."""
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
    precision: str = "fp32"
    """What the model's matrix products compute in (Lightning's names): `fp32` (no autocast),
    or `bf16-mixed` (bfloat16 autocast around every forward pass — local training, LoRA-A2's
    probe, evaluation and generation — and so in the backward pass; on CPU and CUDA alike). The
    LoRA factors, their gradients, AdamW's state and the uploads stay float32 either way. In
    one line with `model.dtype`: `model.dtype` is how the frozen base weights are *stored*,
    `train.precision` what the products *compute* in (a bfloat16-stored base computes in
    bfloat16 even under `fp32`). Fast only on bfloat16 matrix units (CUDA from Ampere on; CPUs
    with AVX512-BF16 or AMX: summary.json's `bf16_path` says which was found); elsewhere
    `train.bf16_matmul` decides how its products run."""
    bf16_matmul: str = "auto"
    """Under `bf16-mixed`, which kernels compute the bfloat16 matrix products (linear layers and
    unfused attention), forward and backward: `bf16` (torch's own: the bfloat16 units where the
    device has them; without them bfloat16 is emulated: on an AVX2 CPU a product ≈ 10× slower
    than float32, a MiniLM training step ≈ 22×), `fp32` (float32 kernels on the same bfloat16
    operands, each product rounded once to bfloat16: a bfloat16 unit's arithmetic up to the
    order of the sums; a MiniLM step 1.2× a float32 one), or `auto` (`bf16` where the device
    has bfloat16 units, `fp32` elsewhere). No effect under `fp32`."""
    deadline_s: float = 0.0
    """Simulated seconds a round waits (needs a `fleet.profile`): a client whose download +
    compute + upload takes longer is a straggler, its work discarded (its download still
    counted); 0 = wait for every client."""
    over_select: float = 0.0
    """Sample ⌈clients_per_round · (1 + over_select)⌉ clients and keep the first
    clients_per_round to finish on the simulated clock (needs a `fleet.profile`); e.g. 0.3 =
    30 % more (Bonawitz et al., MLSys 2019). 0 = off."""
    mode: str = "sync"
    """`sync` (a round samples its clients and waits for them) or `async`: FedBuff (Nguyen et
    al., AISTATS 2022) on the simulated clock — `concurrency` clients train at once, the server
    aggregates every `buffer_size` arrivals with staleness weights s(τ) = 1/√(1+τ) and hands the
    newest state to the next clients; one aggregation is one round (`rounds` counts them).
    Needs a `fleet.profile` (the clock) and the local engine; no DP, SecAgg+, deadline or
    over-selection (docs/FLEETS.md § Asynchronous rounds)."""
    concurrency: int = 8
    """async: C, the clients training at once (≤ the number of clients, ≥ `buffer_size`)."""
    buffer_size: int = 4
    """async: K, the accepted arrivals that make one aggregation."""
    server_lr: float = 1.0
    """async: η_g, the server learning rate of FedBuff's step
    x ← x + η_g Σ_k s(τ_k) (n_k / Σ_j n_j) Δ_k over the buffer."""
    phase_every: int = 0
    """Alternating methods (LoRA-A2, RoLoRA): rounds per A/B phase. 0 = auto: 1 in sync mode
    (the papers' flip every round), ⌈concurrency / buffer_size⌉ in async mode (an update is
    about that many aggregations stale)."""
    cross_phase: str = "drop"
    """async, alternating methods: an update trained in an earlier A/B phase than the one it
    arrives in is `drop`ped (counted in `cross_phase`, not aggregated: the frozen factor it
    trained against has moved, or it trained the factor now frozen) or `apply`ed to the factor
    it trained, with its staleness weight."""


@dataclass
class FleetConfig:
    profile: str = "none"
    """The clients' devices and networks, for the simulated clock (docs/FLEETS.md): `none` (no
    clock, the default), a built-in fleet drawn from published measurements (`mobile`: phones
    on cellular; `mixed`: phones on cellular and Wi-Fi, laptops on Wi-Fi; `uniform`: one
    device for all), or `csv:PATH` with one row per client: `client` (0-based), `flops`
    (sustained FLOP/s), `down_mbps`, `up_mbps` (Mbit/s), optional `availability` (probability
    of being online when sampled, default 1). metrics.jsonl then holds `sim_round_s`,
    `sim_time_s` and each client's download, compute and upload seconds."""


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
    """torch CPU threads (at most 1024); 0 = torch's default."""
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
    """Bound C on the norm of each client's transmitted change (L2; L1 for `laplace`); finite."""
    noise_multiplier: float | None = None
    """z: noise std (Laplace: scale) = z · clip, finite and > 0. Give this or `privacy.epsilon`,
    not both. Either needs `privacy.mechanism` ≠ `none` (with `none` no noise is added; the run
    warns when it starts)."""
    epsilon: float | None = None
    """Target ε over `train.rounds`, in (0, 1000]; the noise multiplier is calibrated to reach
    it (a target too small to calibrate at this δ is refused before the run starts)."""
    delta: float = 1e-5
    """δ of the reported (ε, δ); should be well below 1 / data.num_clients."""
    selection: str = "public"
    """LoRA-A2's slot selection: `public` (the paper: each client's top r_k·N slot ids are
    sent in the clear, chosen from its private data — not covered by ε) or `private` (an
    ε-DP top-k, `privacy.selection_epsilon` per client and round, composed into ε)."""
    selection_epsilon: float = 1.0
    """`private` selection: ε of one client's whole top-k selection in one round, in (0, 1000]
    (pure DP; the one-shot Gumbel mechanism, see `lora_a2.selection.private_top_k`)."""
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
    """SecAgg+ shares per client: an int ≥ 3, or a fraction (0, 1] of the round's clients."""
    reconstruction_threshold: float = 0.5
    """Shares needed to unmask: an int ≥ 2 (< num_shares), or a fraction of num_shares. A
    round survives dropouts as long as every client keeps this many live neighbours."""
    clipping_range: float = 8.0
    """Each entry of a client's secured vector must lie in [−c, c] (SecAgg+ clips silently;
    the client clips first and logs how many entries it clipped); ≥ 1, as the last entry is
    the client's weight n_k/S ≤ 1."""
    quantization_range: int = 4194304
    """Q: entries are quantised to Q levels over [−c, c] (step 2c/Q) before masking."""
    modulus_range: int = 4294967296
    """M: masked vectors live in Z_M; a power of 2 with clients_per_round · Q < M."""
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
    targets: list[float] = field(default_factory=list)
    """Values of the task's headline metric (as metrics.jsonl records it: accuracy and ROUGE-L
    as fractions in [0, 1], e.g. 0.7 = 70 %) whose first reaching the summary reports in
    `time_to_target`: the round, the simulated time (with a `fleet`), the upload and the wall
    time it took. Empty (default) = none."""
    references: list[str] = field(default_factory=lambda: ["fedavg-full", "fl-lora"])
    """Strategies whose upload on the same schedule the summary reports beside this run's
    (`NAME_upload_params`, `NAME_upload_bytes`, `upload_fraction_of_NAME`, with `-` written
    `_`): each client-round this run accepted, at that client's rank budget. Any strategy that
    declares a fixed upload size (`Strategy.reference_upload_values`) may be named."""


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
    the client sampling (and every noise draw under `privacy.noise_source = "seeded"`); in
    [0, 2⁶³)."""
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    fleet: FleetConfig = field(default_factory=FleetConfig)
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
    "fleet": FleetConfig,
    "engine": EngineConfig,
    "server": ServerConfig,
    "privacy": PrivacyConfig,
    "secagg": SecAggConfig,
    "report": ReportConfig,
}


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (_drop_none(v) if isinstance(v, dict) else v) for k, v in d.items() if v is not None}
