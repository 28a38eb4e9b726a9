"""The privacy auditor (lora_a2.audit): its statistics, its power against planted bugs, and
its one-line errors. The full quick audit of every mechanism runs in .ci/run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from scipy.stats import beta

from lora_a2.audit import (PLANTS, clopper_pearson_upper, epsilon_lower_bound, planned_rows,
                           run_audit)
from lora_a2.cli import main
from lora_a2.strategies import REGISTRY, load_all


def test_clopper_pearson_and_the_epsilon_bound():
    # the exact one-sided bound: P[Bin(n, p⁺) ≤ k] = α
    k, n, a = 3, 1000, 0.05
    up = clopper_pearson_upper(k, n, a)
    assert beta.cdf(up, k + 1, n - k) == pytest.approx(1 - a)
    assert clopper_pearson_upper(0, 10, 0.05) == pytest.approx(1 - 0.05 ** (1 / 10))
    # ε ≥ log((1 − δ − FNR⁺) / FPR⁺) with each rate at α/2
    fp, fn, n, d = 10, 5000, 10_000, 1e-5
    expect = math.log((1 - d - clopper_pearson_upper(fn, n, 0.025))
                      / clopper_pearson_upper(fp, n, 0.025))
    assert epsilon_lower_bound(fp, fn, n, d, 0.05) == pytest.approx(expect)
    assert epsilon_lower_bound(n, 0, n, d, 0.05) == 0.0  # a useless test bounds nothing


def test_every_mechanism_the_project_offers_is_audited():
    load_all()
    rows = planned_rows(None, None, None)
    for name, cls in REGISTRY.items():
        for mode in ("local", "central"):
            have = {m for s, md, m in rows if s == name and md == mode}
            if cls.dp_refusal(mode):
                assert not have
            else:
                assert {"gaussian", "laplace"} <= have
                assert ("selection" in have) == (cls.selects_slots and mode == "local")


def test_honest_mechanisms_pass_and_the_laplace_bound_is_tight():
    rows = run_audit(["lora-a2"], None, None, quick=True)
    assert [r.verdict for r in rows] == ["ok"] * len(rows) and len(rows) == 5
    lap = [r for r in rows if r.mechanism == "laplace"]
    # the Laplace test reaches its claim (ε₀ = 1) to within a few per cent: the audit has power
    assert all(0.9 < r.lower_bound <= r.claimed_epsilon for r in lap)


@pytest.mark.parametrize("plant,select", [
    ("half-noise", (["fl-lora"], ["local"], ["laplace"])),
    ("half-noise", (["fl-lora"], ["central"], ["gaussian"])),
    ("no-server-clip", (["flexlora"], ["central"], ["laplace"])),
    ("renormalised-weights", (["fl-lora"], ["central"], ["laplace"])),
    ("gumbel-scale", (["lora-a2"], ["local"], ["selection"])),
])
def test_a_planted_bug_is_flagged(plant, select):
    rows = run_audit(*select, plant=plant, quick=True)
    assert len(rows) == 1 and rows[0].verdict == "VIOLATED"
    assert rows[0].lower_bound > rows[0].claimed_epsilon


def test_cli_exit_codes_and_json(tmp_path, capsys):
    out = tmp_path / "audit.json"
    assert main(["audit-privacy", "--quick", "--strategy", "fl-lora", "--mode", "local",
                 "--mechanism", "laplace", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "1 of 1 mechanisms within their claimed ε" in text
    data = json.loads(out.read_text())
    assert data["within_claim"] == 1 and data["rows"][0]["verdict"] == "ok"
    assert main(["audit-privacy", "--quick", "--plant", "half-noise", "--strategy", "fl-lora",
                 "--mode", "local", "--mechanism", "laplace"]) == 1
    assert "0 of 1 mechanisms" in capsys.readouterr().out


@pytest.mark.parametrize("args,needle", [
    (["--plant", "no-noise"], "--plant"),
    (["--strategy", "hetlora", "--mode", "central"], "hetlora"),
    (["--strategy", "nope"], "unknown strategy"),
    (["--mode", "global"], "--mode"),
    (["--mechanism", "exponential"], "--mechanism"),
    (["--noise-multiplier", "0"], "--noise-multiplier"),
    (["--noise-multiplier", "-1"], "--noise-multiplier"),
    (["--json", "/no/such/folder/audit.json"], "--json"),  # before minutes of sampling
])
def test_bad_audit_input_is_one_line_exit_2(capsys, args, needle):
    assert main(["audit-privacy", "--quick", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err


def test_every_plant_is_named():
    assert set(PLANTS) >= {"half-noise", "no-server-clip", "renormalised-weights",
                           "gumbel-scale"}


def test_the_documented_audit_table_is_the_committed_outputs():
    """docs/PRIVACY.md's measured audit table quotes the committed `--json` outputs: each row's
    verdict count and lower-bound ranges (Gaussian and Laplace, local / central; selection)."""
    root = Path(__file__).parents[1]
    doc = (root / "docs" / "PRIVACY.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in doc.splitlines()
            if line.startswith("| honest") or line.startswith("| `--plant")}
    latest: dict[str, Path] = {}  # the newest dated output of each audit (names sort by date)
    for f in sorted((root / "benchmarks" / "results" / "audit").glob("quick-*-20*.json")):
        latest[f.name[len("quick-"):-len("-YYYY-MM-DD.json")]] = f
    assert set(latest) == {"honest", *PLANTS}
    files = list(latest.values())
    honest = json.loads(latest["honest"].read_text())

    def ranges(d, mech):
        out = []
        for mode in ("local", "central"):
            lb = [r["lower_bound"] for r in d["rows"] if r["mode"] == mode
                  and r["mechanism"] == mech]
            lo, hi = f"{min(lb):.2f}", f"{max(lb):.2f}"
            out.append(lo if lo == hi else f"{lo}–{hi}")
        return out

    for f in files:
        d = json.loads(f.read_text())
        name = "honest" if d["plant"] in (None, "", "none") else f"`--plant {d['plant']}`"
        cells = [c.strip() for c in rows[name].split("|")[2:-1]]
        assert cells[0] == f"{d['within_claim']} of {d['mechanisms']}", (f.name, cells)
        for col, mech in ((1, "gaussian"), (2, "laplace")):
            local, central = ranges(d, mech)
            if name != "honest" and [local, central] == ranges(honest, mech):
                want = "as honest"
            elif name != "honest" and local == ranges(honest, mech)[0]:
                want = f"as honest / {central}"
            else:
                want = f"{local} / {central}"
            assert cells[col] == want, (f.name, mech, cells)
        sel = [r["lower_bound"] for r in d["rows"] if r["mechanism"] == "selection"]
        assert cells[3] == f"{sel[0]:.2f}" or (name != "honest" and cells[3] == "as honest"
                                               and sel == [r["lower_bound"] for r in honest[
                                                   "rows"] if r["mechanism"] == "selection"])
        assert cells[4] == ("0" if d["within_claim"] == d["mechanisms"] else "1")
