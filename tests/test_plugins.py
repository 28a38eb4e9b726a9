"""The public API and the strategy plugin point: the example plugin installed into a temporary
site folder runs on both engines; bad plugins are skipped with a one-line reason."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import lora_a2
from lora_a2.audit import planned_rows
from lora_a2.cli import main
from lora_a2.config import load_config as parse_config
from lora_a2.strategies import PLUGIN_ERRORS, check_config, get_strategy

from conftest import TINY as TINY_RUN

ROOT = Path(__file__).resolve().parents[1]
TINY = [*TINY_RUN, "data.num_clients=3", "train.rounds=2"]


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lora_a2.cli", *args], capture_output=True,
                          text=True, env=env)


def with_path(folder: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(folder), env.get("PYTHONPATH", "")])
    return env


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory) -> Path:
    """examples/lora-a2-fedprox installed (with its entry point) into a throw-away folder."""
    site = tmp_path_factory.mktemp("site")
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                        "--no-build-isolation", "--no-index", "--target", str(site),
                        str(ROOT / "examples" / "lora-a2-fedprox")], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"could not install the example plugin: {r.stderr[-500:]}")
    return site


def fake_plugin(site: Path, name: str, value: str, module: str, code: str) -> None:
    """A distribution with one lora_a2.strategies entry point, written by hand."""
    (site / f"{module}.py").write_text(code)
    info = site / f"{module}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[lora_a2.strategies]\n{name} = {value}\n")


# ---------------------------------------------------------------------- the Python API
def test_python_api_runs_reads_and_overrides(tmp_path, synthetic_csv):
    cfg = lora_a2.load_config(overrides=[f"data.name=csv:{synthetic_csv}", *TINY])
    assert cfg.train.rounds == 2 and cfg.data.num_clients == 3
    nested = lora_a2.load_config(overrides={"data": {"alpha": 0.25}, "train.rounds": 5})
    assert nested.data.alpha == 0.25 and nested.train.rounds == 5
    summary = lora_a2.run(cfg, out=tmp_path / "r", overrides="strategy.name=fl-lora seed=1")
    assert summary["strategy"] == "fl-lora"
    assert lora_a2.read_summary(tmp_path / "r") == summary
    rounds = lora_a2.read_metrics(tmp_path / "r")
    assert [r["round"] for r in rounds] == [1, 2]
    # a crashed run's torn last line is left out; a damaged line before it, a missing run or
    # a damaged summary are one-line errors
    metrics = tmp_path / "r" / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join(lines) + '\n{"round": 3, "accur')
    assert lora_a2.read_metrics(tmp_path / "r") == rounds
    metrics.write_text("\n".join([lines[0][:-5], lines[1]]) + "\n")
    with pytest.raises(lora_a2.UserError, match="line 1 is not valid JSON"):
        lora_a2.read_metrics(tmp_path / "r")
    with pytest.raises(lora_a2.UserError, match="is not a run folder"):
        lora_a2.read_metrics(tmp_path / "typo")
    (tmp_path / "started").mkdir()  # a run that has not finished its first round yet
    (tmp_path / "started" / "config.toml").write_text("")
    assert lora_a2.read_metrics(tmp_path / "started") == []
    (tmp_path / "r" / "summary.json").write_text('{"strategy": "fl-')
    with pytest.raises(lora_a2.UserError, match="is not valid JSON"):
        lora_a2.read_summary(tmp_path / "r")
    assert lora_a2.load_config(overrides=["data.alpha=0.3 train.rounds=4"]).train.rounds == 4
    with pytest.raises(lora_a2.UserError, match="unknown config key 'data.alpah'"):
        lora_a2.load_config(overrides={"data.alpah": 1})
    # one quoted string of pairs, a value with a space in it: two pairs, not one value
    spaced = lora_a2.load_config(overrides='data.name="csv:my data.csv" train.rounds=3')
    assert spaced.data.name == "csv:my data.csv" and spaced.train.rounds == 3
    # (key, value) pairs as load_config takes them; anything else is one line, no traceback
    assert lora_a2.load_config(overrides=[("data.alpha", 0.5)]).data.alpha == 0.5
    with pytest.raises(lora_a2.UserError, match="must be a 'key=value' string, got 3"):
        lora_a2.load_config(overrides=["data.alpha=0.5", 3])


def test_python_api_merges_a_dict_config_and_its_overrides_key_by_key(monkeypatch, tmp_path):
    """lora_a2.run({"data": {...}}, overrides={"data": {...}}): the override's table was a
    shallow replacement of the config's, resetting its other keys to their defaults."""
    import lora_a2.launch

    seen = {}
    monkeypatch.setattr(lora_a2.launch, "run", lambda cfg, out, **kw: seen.update(cfg=cfg) or {})
    lora_a2.run({"data": {"alpha": 0.5, "num_clients": 4}}, out=tmp_path / "o",
                overrides={"data": {"max_train_examples": 100}})
    d = seen["cfg"].data
    assert (d.alpha, d.num_clients, d.max_train_examples) == (0.5, 4, 100)
    assert issubclass(lora_a2.DenseStrategy, lora_a2.Strategy)


@pytest.mark.parametrize("key,value,needle", [("train", "rounds", "train.rounds"),
                                              ("data", "alpha", "data.alpha")])
def test_python_api_checks_a_config_edited_by_hand(tmp_path, synthetic_csv, key, value, needle):
    """A notebook that edits a Config's fields gets the same one-line error as --set, and no
    run folder: the edited object is checked as a file would be."""
    cfg = lora_a2.load_config(overrides=[f"data.name=csv:{synthetic_csv}", *TINY])
    setattr(getattr(cfg, key), value, -1 if value == "alpha" else "three")
    with pytest.raises(lora_a2.UserError, match=needle):
        lora_a2.run(cfg, out=tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_set_takes_several_pairs(tmp_path, capsys):
    assert main(["config", "--set", "data.alpha=0.5", "train.rounds=3", "--set",
                 "seed=2 strategy.lr=0.001", "--set", "strategy.rank_budget=[1, 2, 1, 2, 1, 2, "
                 "1, 2, 1, 2]"]) == 0
    text = capsys.readouterr().out
    assert "alpha = 0.5" in text and "rounds = 3" in text and "seed = 2" in text
    assert "lr = 0.001" in text


# ---------------------------------------------------------------------- the example plugin
@pytest.mark.xdist_group("flower")  # a Ray simulation: one at a time
def test_example_plugin_is_listed_and_runs_on_both_engines(tmp_path, plugin_site, synthetic_csv):
    env = with_path(plugin_site)
    r = cli("strategies", env=env)
    assert r.returncode == 0 and "fedprox-lora" in r.stdout and "[plugin: lora-a2-fedprox]" in \
        r.stdout, r.stdout + r.stderr
    outs = {}
    for engine in ("local", "flower"):
        if engine == "flower":
            pytest.importorskip("flwr")
        args = ["run", "--quiet", "--out", str(tmp_path / engine), "--set",
                f"data.name=csv:{synthetic_csv}", "strategy.name=fedprox-lora",
                "strategy.options.mu=0.5", f"engine.name={engine}", *TINY]
        r = cli(*args, env=env)
        assert r.returncode == 0, r.stderr[-2000:]
        outs[engine] = lora_a2.read_metrics(tmp_path / engine)
    for a, b in zip(outs["local"], outs["flower"]):
        assert a["upload_bytes"] == b["upload_bytes"] and a["download_bytes"] == b["download_bytes"]
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-4)
        assert b["accuracy"] == pytest.approx(a["accuracy"], abs=1e-4)
    # its option is validated like any other key
    r = cli("config", "--set", "strategy.name=fedprox-lora", "strategy.options.nu=1", env=env)
    assert r.returncode == 2 and "has no such option (did you mean 'mu'?)" in r.stderr
    # and checked by the plugin's own typed options class
    r = cli("config", "--set", "strategy.name=fedprox-lora", "strategy.options.mu=-1", env=env)
    assert r.returncode == 2 and "'strategy.options.mu' must be ≥ 0, got -1.0" in r.stderr
    r = cli("config", "--set", "strategy.name=fedprox-lora", "strategy.options.mu='big'", env=env)
    assert r.returncode == 2 and "'strategy.options.mu' must be a number" in r.stderr


def test_fedprox_term_pulls_towards_the_global_adapter(plugin_site, synthetic_csv):
    """μ = 0 is FedIT exactly; a large μ keeps the local change smaller (same seed and data)."""
    sys.path.insert(0, str(plugin_site))
    try:
        import importlib

        import lora_a2_fedprox
        importlib.reload(lora_a2_fedprox)
        from conftest import tiny_setup

        norms = {}
        for mu in (0.0, 50.0):
            cfg, s, rt, ctxs = tiny_setup(["strategy.name=fl-lora", "strategy.lr=0.01"], 2)
            prox = lora_a2_fedprox.FedProxLora(cfg)
            prox.options.mu = mu
            prox.mu = mu
            prox.bind(rt.layout)
            init = rt.initial_state()  # before any training moves the shared model
            state = prox.init_state(init)
            task = prox.configure(1, 0, state)
            up = prox.client_update(ctxs[0], task)
            norms[mu] = float(up.values.norm())
            if mu == 0.0:
                s.bind(rt.layout)
                ref = s.client_update(ctxs[0], s.configure(1, 0, s.init_state(init)))
                assert bool((ref.values == up.values).all())
        assert norms[50.0] < norms[0.0]
    finally:
        sys.path.remove(str(plugin_site))


# ---------------------------------------------------------------------- bad plugins
@pytest.mark.parametrize("ask", ["config", "get_strategy", "audit"])
def test_every_way_to_name_a_strategy_gives_a_failed_plugins_reason(monkeypatch, ask):
    """The config check, the Python API's ``get_strategy`` and ``audit-privacy --strategy``
    give the same one-line error: a failed plugin's reason under its own name, and every
    failed plugin's reason under a name no entry point carried."""
    monkeypatch.setitem(PLUGIN_ERRORS, "ghost", "plugin 'ghost' (ghost_pkg): ImportError: gpu")
    for name, needles in [("ghost", ["strategy 'ghost' is not available: plugin 'ghost' "
                                     "(ghost_pkg): ImportError: gpu"]),
                          ("ghost-lora", ["unknown strategy 'ghost-lora'", "valid: ",
                                          "plugins that failed to load: plugin 'ghost'"])]:
        cfg = parse_config(overrides=[f"strategy.name={name}"])  # schema only: no registry
        with pytest.raises(lora_a2.UserError) as e:
            if ask == "config":
                check_config(cfg)
            elif ask == "get_strategy":
                get_strategy(cfg)
            else:
                planned_rows([name], None, None)
        assert len(str(e.value).splitlines()) == 1
        for needle in needles:
            assert needle in str(e.value), str(e.value)


def test_the_plugin_guides_own_example_loads_and_takes_its_option(tmp_path):
    """docs/STRATEGIES.md §1's FedProx snippet, installed as written: it registers, takes
    strategy.options.mu, and its options' check refuses a negative μ in one line."""
    guide = (ROOT / "docs" / "STRATEGIES.md").read_text()
    code = re.search(r"```python\n(.*?class FedProxLora.*?)```", guide, re.S).group(1)
    site = tmp_path / "site"
    site.mkdir()
    fake_plugin(site, "fedprox-lora", "guide_fedprox:FedProxLora", "guide_fedprox", code)
    env = with_path(site)
    r = cli("config", "--set", "strategy.name=fedprox-lora", "--set", "strategy.options.mu=0.1",
            env=env)
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr
    assert re.search(r"mu = 0\.1\b", r.stdout), r.stdout
    r = cli("config", "--set", "strategy.name=fedprox-lora", "--set", "strategy.options.mu=-1",
            env=env)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "config key 'strategy.options.mu' must be ≥ 0" in r.stderr


def test_bad_plugins_are_skipped_with_one_line_each(tmp_path, synthetic_csv):
    site = tmp_path / "site"
    site.mkdir()
    fake_plugin(site, "broken", "broken_pkg:Nope", "broken_pkg", "import does_not_exist\n")
    fake_plugin(site, "half", "half_pkg:Half", "half_pkg",
                "from lora_a2.strategies.base import Strategy\n"
                "class Half(Strategy):\n    name = 'half'\n"
                "    def configure(self, rnd, client_id, state): ...\n")
    def fl_lora_plugin(name: str, cls: str, body: str) -> None:
        """A plugin subclassing the built-in FL+LoRA with ``body`` in its class."""
        fake_plugin(site, name, f"{name}_pkg:{cls}", f"{name}_pkg",
                    f"from lora_a2.strategies.fl_lora import FlLora\nclass {cls}(FlLora):\n"
                    + "".join(f"    {line}\n" for line in body.splitlines()))

    fake_plugin(site, "exiter", "exiter_pkg:Exiter", "exiter_pkg",
                "import sys\nsys.exit('exiter needs a GPU')\n")
    fl_lora_plugin("clash", "Clash", "name = 'fl-lora'")
    # declarations every run reads for every registered strategy: a wrong one would break
    # the built-ins' runs too, so the plugin is skipped at load
    fl_lora_plugin("opts", "Opts", "name = 'opts'\nOptions = dict")
    fl_lora_plugin("ratio", "Ratio", "name = 'ratio'\npaper_lr_ratio = '5'")
    fl_lora_plugin("flag", "Flag", "name = 'flag'\npersonalized = 'yes'")
    fl_lora_plugin("refusals", "Refusals", "name = 'refusals'\ndp_refusals = ['central']")
    fl_lora_plugin("clear", "Clear", "name = 'clear'\ndp_local_clear = ['the rank']")
    fake_plugin(site, "nodefault", "nodefault_pkg:NoDefault", "nodefault_pkg",
                "import dataclasses\nfrom lora_a2.strategies.fl_lora import FlLora\n"
                "from lora_a2.strategies.options import StrategyOptions\n"
                "class NoDefault(FlLora):\n    name = 'nodefault'\n"
                "    @dataclasses.dataclass\n    class Options(StrategyOptions):\n"
                "        mu: float\n")
    # an option typed with a name that exists only for type checkers
    fake_plugin(site, "hinted", "hinted_pkg:Hinted", "hinted_pkg",
                "from __future__ import annotations\nimport dataclasses\n"
                "from typing import TYPE_CHECKING\n"
                "from lora_a2.strategies.fl_lora import FlLora\n"
                "from lora_a2.strategies.options import StrategyOptions\n"
                "if TYPE_CHECKING:\n    from numbers import Real\n"
                "class Hinted(FlLora):\n    name = 'hinted'\n"
                "    @dataclasses.dataclass\n    class Options(StrategyOptions):\n"
                "        mu: Real = 0.5\n")
    fl_lora_plugin("olddefaults", "OldDefaults",  # the options API of earlier versions
                   "name = 'olddefaults'\noption_defaults = {'mu': 0.01}")
    fl_lora_plugin("checky", "Checky", "name = 'checky'\n@classmethod\n"
                   "def check(cls, cfg, options):\n    1 / 0")
    env = with_path(site)
    r = cli("strategies", env=env)
    assert r.returncode == 0
    assert "fl-lora" in r.stdout and "lora-a2" in r.stdout  # the built-ins are untouched
    warnings = r.stderr.strip().splitlines()
    assert len(warnings) == 12, r.stderr
    assert any("plugin 'olddefaults' (olddefaults_pkg): TypeError: OldDefaults.option_defaults "
               "is no longer read" in w for w in warnings)
    assert any("plugin 'hinted' (hinted_pkg): NameError" in w for w in warnings)
    assert any("plugin 'flag' (flag_pkg): TypeError: Flag.personalized must be True or False"
               in w for w in warnings)
    assert any("plugin 'refusals' (refusals_pkg): TypeError: Refusals.dp_refusals must be a "
               "dict" in w for w in warnings)
    assert any("plugin 'clear' (clear_pkg): TypeError: Clear.dp_local_clear must be a string"
               in w for w in warnings)
    assert any("plugin 'nodefault' (nodefault_pkg): TypeError" in w for w in warnings)
    assert any("plugin 'exiter' (exiter_pkg): SystemExit: exiter needs a GPU" in w
               for w in warnings)  # sys.exit() at import skips the plugin, not the command
    assert any("plugin 'opts' (opts_pkg): TypeError: Opts.Options must be a @dataclass" in w
               for w in warnings)
    assert any("plugin 'ratio' (ratio_pkg): TypeError: Ratio.paper_lr_ratio must be a number"
               in w for w in warnings)
    assert any("plugin 'broken' (broken_pkg): ModuleNotFoundError" in w for w in warnings)
    assert any("plugin 'half' (half_pkg): TypeError: Half does not implement "
               "aggregate, client_update, validate" in w for w in warnings)
    assert any("plugin 'clash' (clash_pkg): ValueError: its strategy name 'fl-lora' is "
               "already a built-in" in w for w in warnings)
    r = cli("config", "--set", "strategy.name=checky", env=env)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "plugin strategy 'checky' (checky_pkg) raised ZeroDivisionError" in r.stderr
    r = cli("run", "--quiet", "--out", str(tmp_path / "o"), "--set", "strategy.name=broken",
            env=env)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "plugin 'broken'" in r.stderr
    # a strategy name no entry point carries: the failed plugins' reasons are still named
    r = cli("config", "--set", "strategy.name=broken-strategy", env=env)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "unknown strategy 'broken-strategy'" in r.stderr
    assert "plugins that failed to load: " in r.stderr and "plugin 'broken'" in r.stderr
    r = cli("audit-privacy", "--quick", "--strategy", "broken", env=env)  # same words there
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "--strategy: strategy 'broken' is not available: plugin 'broken'" in r.stderr
    # the built-in fl-lora still runs as the built-in (not the clashing plugin)
    r = cli("run", "--quiet", "--out", str(tmp_path / "ok"), "--set",
            f"data.name=csv:{synthetic_csv}", "strategy.name=fl-lora", *TINY, env=env)
    assert r.returncode == 0, r.stderr
