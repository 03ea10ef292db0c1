"""Comparison tables of sweep trials (Markdown, CSV, charts) with honest statistics.

A table row gathers the trials of one value of the ``group_by`` keys (an ablation row); the
trials' other overrides (``seed``) tell them apart and pair them with another row's trials.

- n = 1 shows the value alone: one run says nothing about its spread, so no ± is printed.
- n >= 2 shows mean ± the sample standard deviation over the trials.
- With a ``reference`` row (e.g. ``full``), every other row shows, per metric, its paired
  difference to the reference over the trials both ran (same seeds): the mean of row − reference
  and its 95% Student-t interval, marked ``*`` where the interval excludes 0. Pairing removes the
  seed-to-seed variation the two rows share, as a paired t-test does.
- Chance levels and external reference rows (e.g. a dual-encoder baseline's metrics) print as
  rows of their own, so a reader sees how far above chance and above the baseline every row is.
- :func:`judge_claims` turns claims such as "MCR helps retrieval" (row A above row B on a metric)
  into "supported", "contradicted" or "not resolved at this budget" from the paired interval.
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from alignlab.platform import tracking

if TYPE_CHECKING:
    from alignlab.platform.sweep import SweepResult, TrialResult

CONFIDENCE = 0.95
MARK = "*"  # the paired interval excludes 0
SUPPORTED, CONTRADICTED, UNRESOLVED = "supported", "contradicted", "not resolved at this budget"


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairedDifference:
    """Mean of a − b over ``n`` paired trials and its two-sided t-interval (NaN when n < 2)."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def excludes_zero(self) -> bool:
        return self.n >= 2 and (self.low > 0 or self.high < 0)


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE) -> PairedDifference:
    """The paired difference of two equally long samples (a[i] and b[i] from the same seed)."""
    from scipy.stats import t

    if len(a) != len(b) or not a:
        raise ValueError(f"paired samples must be equally long and non-empty, got {len(a)} and {len(b)}")
    d = [x - y for x, y in zip(a, b)]
    n, mean = len(d), sum(d) / len(d)
    if n < 2:
        return PairedDifference(mean, math.nan, math.nan, n)
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    half = float(t.ppf((1 + confidence) / 2, n - 1)) * sd / math.sqrt(n)
    return PairedDifference(mean, mean - half, mean + half, n)


def _mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """(mean, sample std), the std None for a single value: there is no spread to show."""
    if not values:
        return math.nan, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


# --------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------


def row_label(values: Iterable[Any]) -> str:
    """How a row is named in tables and claims: its ``group_by`` values, comma-joined."""
    return ", ".join(str(v) for v in values)


def group_trials(trials: Sequence[TrialResult], group_by: list[str]) -> dict[str, list[TrialResult]]:
    """Finished trials by row label, in the order rows first appear."""
    groups: dict[str, list[TrialResult]] = {}
    for t in trials:
        if not t.error:
            groups.setdefault(row_label(t.overrides.get(k) for k in group_by), []).append(t)
    return groups


def paired_metric(a: Sequence[TrialResult], b: Sequence[TrialResult], group_by: list[str], metric: str,
                  confidence: float = CONFIDENCE) -> PairedDifference | None:
    """a − b on ``metric`` over the trials of two rows that share every non-``group_by``
    override (the seed); None when no trial pairs up."""
    def by_pair(trials):
        return {tuple(sorted((k, str(v)) for k, v in t.overrides.items() if k not in group_by)): t.metrics[metric]
                for t in trials if metric in t.metrics}

    va, vb = by_pair(a), by_pair(b)
    common = sorted(set(va) & set(vb))
    if not common:
        return None
    return paired_difference([va[k] for k in common], [vb[k] for k in common], confidence)


def _check_row(groups: dict[str, list], label: str, what: str) -> None:
    if label not in groups:
        raise ValueError(f"{what} {label!r} is not a row of this sweep; rows: {sorted(groups)}")


def comparison_table(trials: Sequence[TrialResult], group_by: list[str], metrics: list[str],
                     reference: str | None = None, chance: dict[str, float] | None = None,
                     external: dict[str, list[dict[str, float]]] | None = None) -> list[dict[str, Any]]:
    """One row per value of ``group_by`` (``kind`` "sweep"): ``n``, each metric's ``mean`` and
    ``std`` (None for n = 1) and, with ``reference`` (a row label), its paired difference to that
    row: ``diff``, ``diff low``, ``diff high``, ``diff n``, ``diff excludes 0``. Then a row per
    ``external`` label (its runs' metric dicts) and a ``chance`` row, when given."""
    groups = group_trials(trials, group_by)
    if reference is not None:
        _check_row(groups, reference, "reference row")
    rows = []
    for label, members in groups.items():
        row: dict[str, Any] = {"kind": "sweep", **dict(zip(group_by, (members[0].overrides.get(k) for k in group_by))),
                               "n": len(members)}
        for m in metrics:
            row[f"{m} mean"], row[f"{m} std"] = _mean_std([t.metrics[m] for t in members if m in t.metrics])
            if reference is not None and label != reference:
                d = paired_metric(members, groups[reference], group_by, m)
                row[f"{m} diff"], row[f"{m} diff low"], row[f"{m} diff high"], row[f"{m} diff n"] = \
                    (d.mean, d.low, d.high, d.n) if d else (math.nan, math.nan, math.nan, 0)
                row[f"{m} diff excludes 0"] = bool(d and d.excludes_zero)
        rows.append(row)
    for label, runs in (external or {}).items():
        row = {"kind": "external", group_by[0]: label, **{k: "" for k in group_by[1:]}, "n": len(runs)}
        for m in metrics:
            row[f"{m} mean"], row[f"{m} std"] = _mean_std([r[m] for r in runs if m in r])
        rows.append(row)
    if chance:
        row = {"kind": "chance", group_by[0]: "chance", **{k: "" for k in group_by[1:]}, "n": ""}
        for m in metrics:
            row[f"{m} mean"], row[f"{m} std"] = chance.get(m, math.nan), None
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------
# Markdown and CSV
# --------------------------------------------------------------------------------------------


def _digits(rows: list[dict[str, Any]], metric: str) -> int:
    """Two decimals for metrics on a 0-600 scale (RSUM, %), three for fractions (accuracies)."""
    values = [abs(r[f"{metric} mean"]) for r in rows if not math.isnan(r[f"{metric} mean"])]
    return 2 if values and max(values) >= 10 else 3


def _value(row: dict[str, Any], metric: str, digits: int) -> str:
    mean, std = row[f"{metric} mean"], row[f"{metric} std"]
    if math.isnan(mean):
        return "–"
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _signed(x: float, spec: str) -> str:
    """``x`` formatted with a sign; summation noise (RSUMs of equal recalls added in another
    order differ by ~1e-13) shows as +0, never as -0.00 or a difference of 1e-13."""
    return format(round(x, 9) + 0.0, "+" + spec)


def _diff(row: dict[str, Any], metric: str, digits: int) -> str:
    if f"{metric} diff" not in row:
        return ""
    if row[f"{metric} diff n"] == 0:
        return "no paired runs"
    spec = f".{digits}f"
    text = _signed(row[f"{metric} diff"], spec)
    if row[f"{metric} diff n"] < 2:
        return text
    text += f" [{_signed(row[f'{metric} diff low'], spec)}, {_signed(row[f'{metric} diff high'], spec)}]"
    return text + (f" {MARK}" if row[f"{metric} diff excludes 0"] else "")


def to_markdown(rows: list[dict[str, Any]], metrics: list[str], group_by: list[str],
                reference: str | None = None) -> str:
    """The table, then notes on what ± and the paired differences mean."""
    header = group_by + ["n"]
    for m in metrics:
        header += [m] + ([f"Δ vs {reference}"] if reference else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    digits = {m: _digits(rows, m) for m in metrics}
    for r in rows:
        labels = [str(r[k]) for k in group_by]
        if r["kind"] != "sweep":
            labels[0] = f"*{labels[0]}*" + (" (reference)" if r["kind"] == "external" else "")
        cells = labels + [str(r["n"])]
        for m in metrics:
            cells.append(_value(r, m, digits[m]))
            if reference:
                cells.append(_diff(r, m, digits[m]))
        lines.append("| " + " | ".join(cells) + " |")
    notes = []
    sweep_n = [r["n"] for r in rows if r["kind"] == "sweep"]
    if sweep_n and min(sweep_n) < 2:
        notes.append("n = 1: a single run, shown without ± (one run has no spread).")
    if any(r["kind"] == "sweep" and r["n"] >= 2 for r in rows):
        notes.append("mean ± std: sample standard deviation over the row's n runs (seeds).")
    if reference:
        notes.append(f"Δ vs {reference}: the row minus `{reference}`, paired over the seeds both ran: mean "
                     f"[{CONFIDENCE:.0%} t-interval]; {MARK} where the interval excludes 0. With one pair, no "
                     f"interval: the difference cannot be told from seed noise.")
    return "\n".join(lines) + "\n" + "".join(f"\n{n}" for n in notes) + ("\n" if notes else "")


def to_csv(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    fields = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, restval="")
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in r.items()} for r in rows)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# Claims
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    """A claim that row A's ``metric`` is above (``sign`` +1) or below (-1) row B's."""

    text: str
    row_a: str
    row_b: str
    metric: str
    sign: int


@dataclass(frozen=True)
class Verdict:
    claim: Claim
    verdict: str
    difference: PairedDifference | None  # A − B


def judge_claims(trials: Sequence[TrialResult], group_by: list[str], claims: Iterable[Claim | tuple],
                 confidence: float = CONFIDENCE) -> list[Verdict]:
    """Each claim (a :class:`Claim` or its five fields as a tuple) judged by the paired interval
    of A − B: supported where it excludes 0 on the claimed side, contradicted where it excludes 0
    on the other, not resolved at this budget otherwise (too few seeds or too small an effect)."""
    groups = group_trials(trials, group_by)
    out = []
    for c in claims:
        c = c if isinstance(c, Claim) else Claim(*c)
        if c.sign not in (1, -1):
            raise ValueError(f"claim {c.text!r}: sign must be +1 (A above B) or -1 (A below B), got {c.sign}")
        _check_row(groups, c.row_a, f"claim {c.text!r}: row")
        _check_row(groups, c.row_b, f"claim {c.text!r}: row")
        d = paired_metric(groups[c.row_a], groups[c.row_b], group_by, c.metric, confidence)
        verdict = UNRESOLVED
        if d is not None and d.excludes_zero:
            verdict = SUPPORTED if (d.mean > 0) == (c.sign > 0) else CONTRADICTED
        out.append(Verdict(c, verdict, d))
    return out


def claims_markdown(verdicts: list[Verdict]) -> str:
    lines = []
    for v in verdicts:
        c, d = v.claim, v.difference
        if d is None:
            evidence = "no paired runs"
        elif d.n < 2:
            evidence = f"{_signed(d.mean, '.3g')} from one pair, no interval"
        else:
            evidence = f"{_signed(d.mean, '.3g')} [{_signed(d.low, '.3g')}, {_signed(d.high, '.3g')}], n = {d.n}"
        lines.append(f"- **{v.verdict}**: {c.text} ({c.row_a} − {c.row_b} on {c.metric}: {evidence})")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Charts
# --------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bar_chart(rows: list[dict[str, Any]], metrics: list[str], group_by: list[str], path: str, title: str) -> None:
    """One panel per metric (each on its own scale), a bar per row (external rows hatched) with
    std error bars where n >= 2, the paired-difference mark above a bar, chance as a dashed line."""
    plt = _pyplot()
    bars = [r for r in rows if r["kind"] != "chance"]
    chance = next((r for r in rows if r["kind"] == "chance"), None)
    labels = [row_label(r[k] for k in group_by) for r in bars]
    xs = list(range(len(bars)))
    fig, axes = plt.subplots(1, len(metrics), figsize=(max(4.5, 0.9 * len(bars) + 1.5) * len(metrics), 3.8),
                             squeeze=False)
    for ax, m in zip(axes[0], metrics):
        means = [r[f"{m} mean"] for r in bars]
        drawn = ax.bar(xs, means, 0.7)
        spread = [(x, r[f"{m} mean"], r[f"{m} std"]) for x, r in zip(xs, bars) if r[f"{m} std"] is not None]
        if spread:
            ax.errorbar(*zip(*[(x, y) for x, y, _ in spread]), yerr=[e for _, _, e in spread], fmt="none",
                        ecolor="black", capsize=3)
        for x, bar, r in zip(xs, drawn, bars):
            if r["kind"] == "external":
                bar.set_hatch("//")
            if r.get(f"{m} diff excludes 0"):
                ax.annotate(MARK, (x, r[f"{m} mean"] + (r[f"{m} std"] or 0.0)), ha="center", va="bottom")
        if chance is not None and not math.isnan(chance[f"{m} mean"]):
            ax.axhline(chance[f"{m} mean"], linestyle="--", linewidth=1, color="grey", label="chance")
            ax.legend(loc="lower right")
        ax.set_xticks(xs, labels, rotation=20, ha="right")
        ax.set_title(m, fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def line_chart(rows: list[dict[str, Any]], metrics: list[str], x_key: str, path: str, title: str) -> None:
    """Each metric's mean (std error bars where n >= 2) against a numeric key of the sweep rows,
    e.g. SIMLA's retrieval against the number of pseudo-labels k; chance as a dashed line."""
    plt = _pyplot()
    ordered = sorted((r for r in rows if r["kind"] == "sweep"), key=lambda r: float(r[x_key]))
    chance = next((r for r in rows if r["kind"] == "chance"), None)
    xs = [float(r[x_key]) for r in ordered]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for m in metrics:
        stds = [r[f"{m} std"] for r in ordered]
        line = ax.errorbar(xs, [r[f"{m} mean"] for r in ordered], marker="o", capsize=3, label=m,
                           yerr=None if None in stds else stds)
        if chance is not None and not math.isnan(chance[f"{m} mean"]):
            ax.axhline(chance[f"{m} mean"], linestyle="--", linewidth=1, color=line.lines[0].get_color())
    ax.set_xticks(xs, [str(r[x_key]) for r in ordered])
    ax.set_xlabel(x_key)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def publish_comparison(result: SweepResult, group_by: list[str], metrics: list[str], title: str, out_dir: str,
                       line_x: str | None = None, reference: str | None = None,
                       chance: dict[str, float] | None = None,
                       external: dict[str, list[dict[str, float]]] | None = None,
                       claims: Iterable[Claim | tuple] | None = None, artifact_path: str | None = None) -> str:
    """Writes the comparison table (Markdown, CSV) and bar chart, logs them to the sweep's parent
    run, and returns the Markdown. With ``line_x`` (a numeric ``group_by`` key) a line plot of
    the metrics against it is published too (``comparison_line.png``). ``reference`` (a row
    label) adds paired differences, ``chance`` (metric -> value) and ``external`` (label -> its
    runs' metrics) add rows, and ``claims`` add their verdicts below the table. ``artifact_path``
    is the folder of the parent run's artifacts they go to (several tables of one sweep)."""
    rows = comparison_table(result.trials, group_by, metrics, reference, chance, external)
    md = to_markdown(rows, metrics, group_by, reference)
    if claims:
        md += "\nClaims:\n\n" + claims_markdown(judge_claims(result.trials, group_by, claims))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.md").write_text(md)
    (out / "comparison.csv").write_text(to_csv(rows))
    logger = tracking.RunLogger(result.mlflow_uri, result.parent_run_id)
    logger.log_artifact(str(out / "comparison.md"), artifact_path)
    logger.log_artifact(str(out / "comparison.csv"), artifact_path)
    if any(r["kind"] == "sweep" for r in rows):
        bar_chart(rows, metrics, group_by, str(out / "comparison.png"), title)
        logger.log_artifact(str(out / "comparison.png"), artifact_path)
        if line_x:
            line_chart(rows, metrics, line_x, str(out / "comparison_line.png"), title)
            logger.log_artifact(str(out / "comparison_line.png"), artifact_path)
    return md
