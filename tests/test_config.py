"""Config: TOML + --set, validation, one-line errors naming the key, exit code 2 from the CLI."""

import tomllib
from pathlib import Path

import pytest

from lora_a2.cli import main

from conftest import assert_config_error
from lora_a2.checks import load_config  # schema, ranges and every component's checks
from lora_a2.config import LEGACY_STRATEGY_OPTIONS, Config, all_keys
from lora_a2.config import flatten
from lora_a2.errors import UserError

STABLE_KEYS = """seed model.name model.max_length model.head data.name data.text_column
data.label_column data.num_clients data.partition data.alpha data.classes_per_client
data.max_train_examples data.max_test_examples strategy.name strategy.global_rank
strategy.rank_budget strategy.lr strategy.lr_ratio train.rounds train.local_epochs
train.batch_size train.clients_per_round engine.name""".split()


def test_stable_keys_exist():
    assert set(STABLE_KEYS) <= set(all_keys())


def test_defaults_are_the_embedded_demo():
    cfg = load_config()
    assert (cfg.model.name, cfg.data.name, cfg.data.num_clients, cfg.data.partition,
            cfg.data.alpha, cfg.strategy.name, cfg.strategy.global_rank,
            cfg.strategy.rank_budget) == ("minilm", "bbc-news", 10, "dirichlet", 0.1, "lora-a2", 8, 2)


def test_toml_file_and_overrides(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('seed = 3\n[data]\nalpha = 0.5\n[strategy]\nrank_budget = [1, 2]\n'
                 '[train]\nrounds = 2\n')
    cfg = load_config(p, ["data.num_clients=2", "strategy.name=hetlora", "train.rounds=4"])
    assert cfg.seed == 3 and cfg.data.alpha == 0.5 and cfg.train.rounds == 4
    assert cfg.strategy.name == "hetlora" and cfg.strategy.rank_budget == [1, 2]
    # the resolved config round-trips through TOML
    again = tmp_path / "again.toml"
    again.write_text(cfg.to_toml())
    assert load_config(again) == cfg


@pytest.mark.parametrize("sets,needle", [
    (["data.alpah=0.5"], "did you mean 'data.alpha'"),
    (["rounds=3"], "did you mean 'train.rounds'"),
    (["train.rounds=0"], "'train.rounds' must be ≥ 1"),
    (["train.rounds=two"], "'train.rounds' must be an integer"),
    (["data.alpha=0"], "'data.alpha' must be > 0"),
    (["data.alpha=-1"], "'data.alpha' must be > 0"),
    (["strategy.rank_budget=9"], "'strategy.rank_budget' must be in [1, strategy.global_rank = 8]"),
    (["strategy.rank_budget=[1, 2]"], "one budget per client (10)"),
    # a baseline that trains one rank everywhere: refused before anything loads
    (["strategy.name=fl-lora", "data.num_clients=2", "strategy.rank_budget=[1, 2]"],
     "strategy 'fl-lora' trains one rank on every client: give a single integer (this gives "
     "ranks 1, 2)"),
    (["strategy.name=rolora", "data.num_clients=20", "strategy.rank_budget=uniform"],
     "strategy 'rolora' trains one rank on every client"),
    # knobs that would do nothing here: refused, not silently ignored
    (["strategy.name=flora", "model.lora_alpha=32"],
     "'model.lora_alpha' is not used by strategy 'flora'"),
    (["train.buffer_size=2"], "'train.buffer_size' is for train.mode = 'async'"),
    (["train.concurrency=3"], "'train.concurrency' is for train.mode = 'async'"),
    (["train.server_lr=0.5"], "'train.server_lr' is for train.mode = 'async'"),
    (["train.cross_phase=apply"], "'train.cross_phase' is for train.mode = 'async'"),
    (["strategy.name=fl-lora", "train.phase_every=2"],
     "'train.phase_every' is for strategies that alternate the LoRA factors (lora-a2, rolora)"),
    (["strategy.name=lora-a3"], "did you mean 'lora-a2'"),
    (["model.head=thawed"], "'model.head'"),
    (["data.partition=random"], "'data.partition'"),
    (["train.clients_per_round=1.5"], "'train.clients_per_round'"),
    (["train.clients_per_round=11"], "'train.clients_per_round'"),
    (["engine.name=ray"], "must be 'local' or 'flower'"),
    (["engine.name=ray"], "'engine.name'"),
    (["novalue"], "key=value"),
    (["train.dropout=1.5"], "'train.dropout'"),
    (["train.min_replies=0"], "'train.min_replies'"),
    (["train.min_replies=11"], "must not exceed"),
    (["server.max_update_bytes=10"], "'server.max_update_bytes'"),
    (["server.max_update_norm=-1"], "'server.max_update_norm'"),
    (["engine.num_workers=-1"], "'engine.num_workers'"),
    (["engine.round_timeout_s=-5"], "'engine.round_timeout_s'"),
    (["engine.connect_timeout_s=-1"], "'engine.connect_timeout_s'"),
    (["engine.device=tpu"], "'engine.device'"),
    (["engine.device=cuda:abc"], "'engine.device'"),
    (["engine.device=cudafoo"], "'engine.device'"),
    # past float32 (the model's), a number is inf there: 1e39 broke AdamW mid-run
    (["strategy.lr=1e39"], "'strategy.lr' must fit in float32"),
    (["train.mode=async", "train.server_lr=1e300"], "'train.server_lr' must fit in float32"),
    (["privacy.mechanism=gaussian", "privacy.noise_multiplier=1", "privacy.clip=1e308"],
     "'privacy.clip' must fit in float32"),
    (["strategy.lr=-3.5e38"], "'strategy.lr' must fit in float32"),
    (["engine.threads=100000"], "'engine.threads' must be in [0, 1024]"),
    (["engine.threads=100000000000000000000"], "'engine.threads' must be in [0, 1024]"),
    # argv's undecodable byte (a lone surrogate): config.toml could not be written
    (["report.mlflow_experiment=\udcff"], "'report.mlflow_experiment' must be text that UTF-8"),
    (["data.name=csv:/tmp/x\udcff.csv"], "'data.name' must be text that UTF-8"),
    (["model.target_modules=['query', '\udcff']"], "'model.target_modules' must be text"),
])
def test_bad_values_are_one_line_errors(sets, needle):
    with pytest.raises(UserError) as e:
        load_config(None, sets)
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("sets,needle", [
    (["report.targets=[70]"], "'report.targets' entries must be within task 'classification''s "
                              "accuracy range [0, 1] (0.7 = 70 %), got 70.0"),
    (["report.targets=[0.5, -1]"], "range [0, 1]"),
    (["model.name=tiny-random-llama", "data.name=chatterbot", "report.targets=[1.5]"],
     "task 'causal-lm''s rouge_l range [0, 1]"),
])
def test_targets_outside_the_task_s_metric_range_are_refused(capsys, sets, needle):
    """70 (for 70 %) could never be reached, -1 is reached at once."""
    assert_config_error(capsys, sets, needle)


def test_a_task_with_an_unbounded_metric_takes_any_target(monkeypatch):
    from lora_a2.tasks import TASKS

    monkeypatch.setattr(TASKS["classification"], "metric_range", None)
    assert load_config(None, ["report.targets=[70]"]).report.targets == [70.0]


def test_a_noise_multiplier_the_accountant_cannot_account_is_refused_by_the_config_checks(
        capsys):
    assert_config_error(capsys, ["privacy.mechanism=gaussian", "privacy.noise_multiplier=1e-300"],
                        "finite ε")


def test_values_at_the_edges_of_those_ranges_are_accepted():
    cfg = load_config(None, ["strategy.lr=3.4e38", "engine.threads=1024",
                             "report.targets=[0.0, 1.0]", "report.mlflow_experiment=café ☕"])
    assert (cfg.strategy.lr, cfg.engine.threads, cfg.report.targets) == (3.4e38, 1024, [0.0, 1.0])


def test_a_single_rank_baseline_takes_a_list_or_draw_that_gives_one_rank():
    """[2, 2] or any list with one value is one rank: accepted, as for the built-in check at
    run time; every single-rank baseline declares it."""
    from lora_a2.strategies import REGISTRY

    load_config(None, ["strategy.name=fl-lora", "data.num_clients=2", "strategy.rank_budget=[2, 2]"])
    assert {n for n, c in REGISTRY.items() if c.single_rank} == {
        "fl-lora", "ffa-lora", "rolora", "fedsa-lora", "fedex-lora", "fedsvd"}


def test_bad_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(UserError, match="is a folder"):
        load_config(tmp_path)
    bad = tmp_path / "bad.toml"
    bad.write_text("[data\nalpha = ")
    with pytest.raises(UserError, match="not valid TOML"):
        load_config(bad)
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[dataa]\nalpha = 1\n")
    with pytest.raises(UserError, match="unknown config key 'dataa'"):
        load_config(unknown)
    table = tmp_path / "table.toml"  # a table where a value belongs names the value's type
    table.write_text("[train.rounds]\nx = 1\n")
    with pytest.raises(UserError, match=r"config key 'train.rounds' must be an integer, got \{"):
        load_config(table)
    table.write_text("[strategy.probe_epochs]\nx = 1\n")  # a short-form strategy option
    with pytest.raises(UserError, match="probe_epochs. must be"):
        load_config(table)
    table.write_text("[train.nope]\nx = 1\n")
    with pytest.raises(UserError, match="unknown config key 'train.nope'"):
        load_config(table)


def test_cli_exit_code_2_and_one_line(capsys):
    assert main(["run", "--set", "data.alpah=0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "data.alpha" in err
    with pytest.raises(SystemExit) as e:
        main(["run", "--bogus"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().count("\n") == 0


def test_cli_config_prints_resolved_toml(capsys):
    assert main(["config", "--set", "train.rounds=3"]) == 0
    out = capsys.readouterr().out
    assert "rounds = 3" in out and "[strategy]" in out


def test_config_equality_default():
    from lora_a2.config import load_config as parse  # the schema alone

    assert Config() == parse()
    # the checks fill in the strategy's options: a resolved config lists every one
    cfg = load_config()
    assert cfg.strategy.options["probe"] == "full" and cfg.strategy.options["renormalize"] is False
    assert load_config(None, ["strategy.name=fl-lora"]).strategy.options == {}


def test_negative_lr_ratio_is_a_one_line_error(capsys):
    from lora_a2.cli import main

    assert main(["config", "--set", "strategy.lr_ratio=-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "strategy.lr_ratio" in err


def test_resume_check_ignores_only_what_cannot_change_the_run(tmp_path):
    """A run started under schema 1 (no DP) resumes under schema 2; a different setting, or a
    different noise source under DP, is refused."""
    from lora_a2.runner import check_same_config

    old = tmp_path / "old.toml"
    old.write_text("seed = 1\n[train]\nrounds = 3\n")  # schema 1: noise_source "seeded"
    saved = load_config(old)
    assert saved.schema_version == 1 and saved.privacy.noise_source == "seeded"
    check_same_config(load_config(None, ["seed=1", "train.rounds=3"]), saved, tmp_path)
    with pytest.raises(UserError, match="'train.rounds' is 4, the run's own is 3"):
        check_same_config(load_config(None, ["seed=1", "train.rounds=4"]), saved, tmp_path)
    dp = ["privacy.mechanism=gaussian", "privacy.noise_multiplier=1"]
    with pytest.raises(UserError, match="privacy.noise_source"):
        check_same_config(load_config(None, dp), load_config(None, dp + [
            "privacy.noise_source=seeded"]), tmp_path)


# ---------------------------------------------------------------------- committed configs
RESULTS = Path(__file__).parents[1] / "benchmarks" / "results"


def _effective(cfg: Config, key: str):
    """What a run of ``cfg`` uses for a dotted key, a legacy ``strategy.NAME`` included."""
    sec, _, name = key.partition(".")
    if sec == "strategy" and name in LEGACY_STRATEGY_OPTIONS:
        return cfg.strategy.options.get(name, LEGACY_STRATEGY_OPTIONS[name])
    if not name:
        return getattr(cfg, sec)
    return getattr(getattr(cfg, sec), name)


def test_every_committed_cell_config_loads_to_what_it_ran_with():
    """Each key of every committed cell's config.toml (written before the strategies' typed
    options, so with LoRA-A2's and HetLoRA's knobs as ``strategy.NAME`` for every strategy)
    still means what it meant: the loaded config uses the file's value for it."""
    paths = sorted(RESULTS.glob("**/config.toml"))
    assert len(paths) > 100
    moved = 0
    for p in paths:
        raw = dict(flatten(tomllib.loads(p.read_text())))
        cfg = load_config(p)
        for key, value in raw.items():
            if key == "strategy.options":  # a table of its own: each entry kept
                assert value.items() <= cfg.strategy.options.items(), p
                continue
            assert _effective(cfg, key) == value, (p, key)
        moved += bool(cfg.strategy.options)
        # an option the strategy has not got arrived only at its old default (then dropped)
        if cfg.strategy.name not in ("lora-a2", "hetlora"):
            assert cfg.strategy.options == {}, p
    assert moved > 50  # lora-a2 and hetlora cells: their options now live in strategy.options


def test_committed_cells_keep_their_cell_ids():
    """Every committed cell folder of a built-in grid is a cell id the grid still expands to."""
    from lora_a2.bench import builtin_grids, expand, load_grid

    checked = 0
    for name in builtin_grids():
        cells_dir = RESULTS / name / "cells"
        if not cells_dir.is_dir():
            continue
        committed = {d.name for d in cells_dir.iterdir() if (d / "config.toml").is_file()}
        ids = {c.cell_id for c in expand(load_grid(name))}
        assert committed <= ids, (name, sorted(committed - ids)[:3])
        checked += len(committed)
    assert checked > 100


def test_a_legacy_short_key_sets_the_option_and_overrides_a_table(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[strategy]\nname = "lora-a2"\n[strategy.options]\nprobe = "reuse"\n')
    assert load_config(p).strategy.options["probe"] == "reuse"
    # the short form given afterwards overrides the table, also at the old default
    assert load_config(p, ["strategy.probe=full"]).strategy.options["probe"] == "full"
    # a strategy without that option: its old default is moot, another value is an error
    assert load_config(None, ["strategy.name=fl-lora", "strategy.probe=full"]
                       ).strategy.options == {}
    with pytest.raises(UserError, match=r"strategy.options.probe.*fl-lora.*has no such option"):
        load_config(None, ["strategy.name=fl-lora", "strategy.probe=reuse"])


def test_a_resolved_config_can_switch_strategy(tmp_path):
    """A resolved LoRA-A2 config lists LoRA-A2's options at their defaults: switching it to
    another strategy drops them (moot there); one the user changed is an error, not ignored."""
    p = tmp_path / "resolved.toml"
    p.write_text(load_config(None, ["strategy.name=lora-a2"]).to_toml())
    assert "[strategy.options]" in p.read_text() and 'probe = "full"' in p.read_text()
    cfg = load_config(p, ["strategy.name=hetlora"])
    assert cfg.strategy.options == {"prune_gamma": 0.99, "prune_lambda": 1e-3,
                                    "hetlora_weights": "module"}
    with pytest.raises(UserError, match=r"'strategy.options.probe': strategy 'fl-lora'"):
        load_config(p, ["strategy.name=fl-lora", "strategy.options.probe=gradient"])


@pytest.mark.parametrize("sets,needle", [
    (["strategy.options.probe=cheap"], "strategy.options.probe' must be one of full"),
    (["strategy.probe_fraction=0.5", "strategy.probe=gradient"],
     "strategy.options.probe_fraction' shortens the full probe"),
    (["strategy.options.probe_epochs=0"], "strategy.options.probe_epochs' must be ≥ 1"),
    (["strategy.options.reselect_every=1.5"], "strategy.options.reselect_every' must be an integer"),
    (["strategy.options.slot_score=l1"], "strategy.options.slot_score' must be one of frobenius"),
    (["strategy.options.probe_epoch=2"], "did you mean 'probe_epochs'"),
    # a knob of one probe kind set with another would silently do nothing
    (["strategy.options.probe_optimizer=kept"], "'kept' continues the reuse probe's optimiser"),
    (["strategy.options.probe=gradient", "strategy.options.probe_epochs=2"],
     "probe_epochs' sets the full probe's length"),
    (["strategy.options.probe=reuse", "strategy.options.probe_batches=8"],
     "probe_batches' sets the gradient probe's batches"),
    (["strategy.name=hetlora", "strategy.options.prune_gamma=0"], "prune_gamma' must be in (0, 1]"),
    (["strategy.name=hetlora", "strategy.hetlora_weights=layer"], "hetlora_weights' must be one"),
    # a partition's or a task's own knob, set for another, would do nothing
    (["data.partition=iid", "data.alpha=0.5"],
     "'data.alpha' is read only by data.partition = 'dirichlet' (this run's is 'iid')"),
    (["data.classes_per_client=3"],
     "'data.classes_per_client' is read only by data.partition = 'pathological' or 'paired'"),
    (["data.category_column=topic"], "'data.category_column' is read only by task 'causal-lm'"),
    (["task.max_new_tokens=99"], "'task.max_new_tokens' is read only by task 'causal-lm'"),
    (["task.name=classification", "data.response_column=r"],
     "'data.response_column' is read only by task 'causal-lm'"),
    (["model.name=tiny-random-llama", "data.name=chatterbot", "data.text_column=question"],
     "'data.text_column' is read only by task 'classification'; this run's task is 'causal-lm'"),
    (["fleet.profile=mobile", "train.deadline_s=60", "strategy.rank_budget=auto",
      "strategy.options.reselect_every=2"],
     "reselect_every' cannot be combined with strategy.rank_budget = 'auto'"),
    (["strategy.options.renormalize=true", "privacy.mechanism=gaussian", "privacy.mode=central",
      "privacy.noise_multiplier=1"], "'central' cannot be combined with strategy.options.renormalize"),
])
def test_strategy_options_are_checked_by_their_strategy(capsys, sets, needle):
    assert_config_error(capsys, sets, needle)


@pytest.mark.parametrize("name", ["lora-a2", "fedavg"])
def test_a_reference_without_a_fixed_upload_is_one_line(capsys, name):
    """report.references names strategies whose upload the model alone fixes."""
    assert_config_error(capsys, [f"report.references=['{name}']"], "report.references")
