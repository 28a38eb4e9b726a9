"""The console summary printed when a run ends (``lora-a2 run``): the task's metric lines,
bytes up and down against fedavg-full and fl-lora, data rows skipped, privacy, wall time."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .base import Reporter, RunStart


class ConsoleSummary(Reporter):
    def __init__(self, print_fn: Callable[[str], None] = print) -> None:
        self.print = print_fn
        self.lines: Callable[[dict[str, Any]], list[str]] | None = None

    def start(self, run: RunStart) -> None:
        self.lines = run.summary_lines

    def end(self, summary: dict[str, Any], records: list[dict[str, Any]]) -> None:
        self.print(format_summary(summary, self.lines(summary) if self.lines else []))


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def _references(s: dict[str, Any]) -> str:
    """`` = x% of fedavg-full's N MB, y% of fl-lora's at the same rank`` for the summary's
    reference strategies (``report.references``, in the order given): the first with its size,
    and any later one whose upload does not depend on the rank too; "at the same rank" for a
    rank-based one (a summary without ``NAME_scales_with_rank``, from before it was recorded:
    the first one is taken as rank-free, the rest as rank-based)."""
    names = [k[len("upload_fraction_of_"):] for k in s if k.startswith("upload_fraction_of_")]
    parts = []
    for key in names:
        frac, size = s.get(f"upload_fraction_of_{key}"), s.get(f"{key}_upload_bytes")
        if frac is None or not s.get(f"{key}_upload_params"):
            continue
        scales = s.get(f"{key}_scales_with_rank", bool(parts))
        part = f"{100 * frac:.3f}%" if frac < 0.01 else f"{100 * frac:.1f}%"
        part += f" of {key.replace('_', '-')}'s"
        if not parts or not scales:
            part += f" {human_bytes(size)}"
        parts.append(part + (" at the same rank" if scales else ""))
    return (" = " + ", ".join(parts)) if parts else ""


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds:.0f} s"


def format_summary(s: dict[str, Any], metric_lines: list[str]) -> str:
    """The console summary; ``metric_lines`` are the task's (accuracy, or loss and ROUGE-L)."""
    lines = [
        f"strategy {s['strategy']} · model {s['model']} · data {s['data']} · "
        f"{s['num_clients']} clients · {s['rounds']} rounds",
        *metric_lines,
        (f"  upload     {human_bytes(s['total_upload_bytes'])} ({s['total_upload_params']:,} "
         f"values)" + _references(s))
        if s.get("total_upload_bytes") is not None else
        "  upload     withheld from the release (central DP: its size depends on the data; "
        "see server_log.jsonl)",
        f"  download   {human_bytes(s['total_download_bytes'])} "
        f"({s['total_download_params']:,} values)",
        *([f"  precision  {s['precision_detail']}"] if s.get("precision_detail") else []),
        f"  wall time  {s['wall_s']:.1f} s",
        f"  outputs    {s['out_dir']}",
    ]
    rows = s.get("data_rows") or {}
    skipped = {k: v for k, v in rows.get("skipped", {}).items() if v}
    if skipped or rows.get("truncated"):
        why = ", ".join(f"{v:,} {k}" for k, v in skipped.items())
        lines.insert(1 + len(metric_lines),
                     f"  data       {rows.get('read', 0):,} rows read, "
                     f"{rows.get('kept', 0):,} kept"
                     + (f"; skipped: {why}" if why else "")
                     + (f"; {rows['truncated']:,} inputs shortened to fit"
                        if rows.get("truncated") else ""))
    natural = rows.get("natural_clients") or {}
    if "clients" in natural:
        left = [f"{natural[k]:,} {why}" for k, why in (
            ("below_min", "below data.min_examples_per_client dropped"),
            ("beyond_num_clients", "smaller ones beyond data.num_clients"),
            ("beyond_max_train_examples", "beyond data.max_train_examples")) if natural.get(k)]
        lines.insert(1 + len(metric_lines),
                     f"  clients    {natural['clients']:,} natural clients by "
                     f"'{natural.get('column', '?')}' of {natural.get('found', 0):,}"
                     + (f"; left out: {', '.join(left)}" if left else ""))
    if s.get("sim_time_s") is not None:
        lines.insert(len(lines) - 2, f"  sim time   {_duration(s['sim_time_s'])} on the fleet "
                     f"({s.get('stragglers', 0):,} stragglers, {s.get('offline_clients', 0):,} "
                     f"offline)")
    for t in s.get("time_to_target") or []:
        reached = (f"round {t['round']}" + (f", {_duration(t['sim_time_s'])} simulated"
                                            if t.get("sim_time_s") is not None else "")
                   + (f", {human_bytes(t['upload_bytes'])} uploaded"
                      if t.get("upload_bytes") is not None else "")
                   if t["round"] is not None else "not reached")
        lines.insert(len(lines) - 2, f"  target     {s.get('metric', 'metric')} {t['target']:g}: "
                     f"{reached}")
    if s.get("epsilon") is not None:
        p = s.get("privacy", {})
        lines.insert(len(lines) - 2, f"  privacy    ε = {s['epsilon']:.3g}, δ = {s['delta']:g} "
                        f"({p.get('mechanism', '?')}, {p.get('mode', '?')}, clip "
                        f"{p.get('clip', '?')}, noise multiplier {p.get('noise_multiplier', '?')})"
                        + (f"; slot selection private, its share ε = "
                           f"{s['selection_epsilon']:.3g}" if s.get("selection_epsilon")
                           is not None else "")
                        + f"; noise {p.get('noise_source', '?')}")
        for caveat in p.get("caveats", []):
            lines.insert(len(lines) - 2, f"  caveat     {caveat}")
    if s.get("rejected_updates"):
        lines.insert(len(lines) - 2, f"  rejected   {s['rejected_updates']} updates")
    return "\n".join(lines)
