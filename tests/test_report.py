"""Comparison tables with honest statistics: ± only from two runs up, paired differences to a
reference row with t-intervals, chance and external rows, and claims judged from the intervals."""
import math

import pytest

from alignlab.platform.report import (CONTRADICTED, SUPPORTED, UNRESOLVED, Claim, claims_markdown, comparison_table,
                                      judge_claims, paired_difference, to_csv, to_markdown)
from alignlab.platform.sweep import TrialResult

T_975_2 = 4.302653  # Student t, 97.5% quantile, 2 degrees of freedom (statistical tables)
KEY = "model.mvptr.ablation"


def test_paired_difference_on_a_hand_computed_case():
    # Differences 2, 3, 4: mean 3, sd 1, standard error 1/sqrt(3).
    d = paired_difference([12.0, 13.0, 14.0], [10.0, 10.0, 10.0])
    half = T_975_2 / math.sqrt(3)
    assert d.n == 3 and d.mean == pytest.approx(3.0)
    assert (d.low, d.high) == (pytest.approx(3 - half, rel=1e-6), pytest.approx(3 + half, rel=1e-6))
    assert d.excludes_zero  # [0.516, 5.484]
    # Differences 2, 1, 4: mean 7/3, sd sqrt(7/3); the interval [-1.46, 6.13] holds 0.
    d = paired_difference([10.0, 12.0, 15.0], [8.0, 11.0, 11.0])
    half = T_975_2 * math.sqrt(7 / 3) / math.sqrt(3)
    assert d.mean == pytest.approx(7 / 3) and d.low == pytest.approx(7 / 3 - half, rel=1e-6)
    assert not d.excludes_zero
    # One pair: a difference, no interval.
    d = paired_difference([5.0], [3.0])
    assert d.mean == 2.0 and math.isnan(d.low) and not d.excludes_zero
    with pytest.raises(ValueError, match="equally long"):
        paired_difference([1.0, 2.0], [1.0])


def _trials():
    """full and wo_mcr over seeds 0-2 (wo_mcr 2, 3, 4 below full on rsum: an effect the
    interval resolves), wo_wpg over seeds 0-2 (-2, -1, -4 on rsum: it does not), single: seed 0
    only, and a failed trial that must not count."""
    full = [100.0, 110.0, 120.0]
    rows = {"full": full, "wo_mcr": [v - d for v, d in zip(full, (2, 3, 4))],
            "wo_wpg": [v - d for v, d in zip(full, (2, 1, 4))], "single": [107.0]}
    trials = [TrialResult({KEY: row, "seed": s}, {"eval/rsum": v, "eval/acc": 0.5 + 0.01 * s})
              for row, values in rows.items() for s, v in enumerate(values)]
    return trials + [TrialResult({KEY: "wo_mcr", "seed": 9}, {}, error="boom")]


def test_plus_minus_only_from_two_runs_and_paired_differences_to_the_reference():
    rows = comparison_table(_trials(), [KEY], ["eval/rsum"], reference="full", chance={"eval/rsum": 16.3},
                            external={"dual_encoder": [{"eval/rsum": 90.0}, {"eval/rsum": 94.0}]})
    by = {r[KEY]: r for r in rows}
    assert [r["kind"] for r in rows] == ["sweep"] * 4 + ["external", "chance"]
    assert by["full"]["n"] == 3 and by["wo_mcr"]["n"] == 3 and by["single"]["n"] == 1
    assert by["full"]["eval/rsum std"] == pytest.approx(10.0) and by["single"]["eval/rsum std"] is None
    assert "eval/rsum diff" not in by["full"]
    assert by["wo_mcr"]["eval/rsum diff"] == pytest.approx(-3.0) and by["wo_mcr"]["eval/rsum diff excludes 0"]
    assert not by["wo_wpg"]["eval/rsum diff excludes 0"]
    # single pairs with full on seed 0 only: 107 - 100, without an interval.
    assert by["single"]["eval/rsum diff"] == 7.0 and by["single"]["eval/rsum diff n"] == 1

    md = to_markdown(rows, ["eval/rsum"], [KEY], reference="full")
    lines = md.splitlines()
    assert lines[0] == f"| {KEY} | n | eval/rsum | Δ vs full |"
    half = T_975_2 / math.sqrt(3)
    assert f"| wo_mcr | 3 | 107.00 ± 9.00 | -3.00 [{-3 - half:+.2f}, {-3 + half:+.2f}] * |" in lines
    assert "| full | 3 | 110.00 ± 10.00 |  |" in lines
    assert "| single | 1 | 107.00 | +7.00 |" in lines  # n = 1: no ±, no interval
    assert "| *dual_encoder* (reference) | 2 | 92.00 ± 2.83 |  |" in lines
    assert "| *chance* |  | 16.30 |  |" in lines
    assert not any("wo_wpg" in line and "*" in line for line in lines)
    assert "n = 1: a single run, shown without ±" in md and "t-interval" in md

    csv_lines = to_csv(rows).splitlines()
    header = csv_lines[0].split(",")
    single = dict(zip(header, next(line for line in csv_lines if ",single," in line).split(",")))
    assert single["eval/rsum std"] == "" and single["n"] == "1"


def test_one_seed_tables_show_no_plus_minus_anywhere():
    trials = [TrialResult({KEY: r}, {"eval/rsum": v}) for r, v in (("full", 325.5), ("wo_mcr", 305.75))]
    md = to_markdown(comparison_table(trials, [KEY], ["eval/rsum"], reference="full"), ["eval/rsum"], [KEY], "full")
    assert "±" not in md.split("\n\n")[0] and "| wo_mcr | 1 | 305.75 | -19.75 |" in md
    with pytest.raises(ValueError, match="reference row 'fulll' is not a row of this sweep; rows: "):
        comparison_table(trials, [KEY], ["eval/rsum"], reference="fulll")


def test_claims_are_judged_from_the_paired_interval():
    verdicts = judge_claims(_trials(), [KEY], [
        Claim("MCR helps retrieval", "full", "wo_mcr", "eval/rsum", +1),
        ("MCR hurts retrieval", "full", "wo_mcr", "eval/rsum", -1),
        ("WPG helps retrieval", "full", "wo_wpg", "eval/rsum", +1),
        ("one seed decides nothing", "single", "full", "eval/rsum", +1),
        ("no such metric", "full", "wo_mcr", "eval/missing", +1),
    ])
    assert [v.verdict for v in verdicts] == [SUPPORTED, CONTRADICTED, UNRESOLVED, UNRESOLVED, UNRESOLVED]
    assert verdicts[0].difference.mean == pytest.approx(3.0) and verdicts[3].difference.n == 1
    assert verdicts[4].difference is None
    with pytest.raises(ValueError, match="row 'wo_tag' is not a row"):
        judge_claims(_trials(), [KEY], [("x", "full", "wo_tag", "eval/rsum", 1)])


def test_equal_figures_summed_in_another_order_differ_by_nothing_shown():
    # Two RSUMs of the same total added in another order: 1e-13 apart, shown as no difference.
    recalls = [33.5, 200 / 3, 250 / 3, 50 / 3, 49.9, 50.1]
    a, b = sum(recalls), sum(recalls[:4] + recalls[:3:-1])
    assert a != b and abs(a - b) < 1e-12
    trials = [TrialResult({KEY: r}, {"eval/rsum": v}) for r, v in (("full", a), ("wo_mcr", b))]
    md = to_markdown(comparison_table(trials, [KEY], ["eval/rsum"], reference="full"), ["eval/rsum"], [KEY], "full")
    assert "| wo_mcr | 1 | 300.17 | +0.00 |" in md
    claims = claims_markdown(judge_claims(trials, [KEY], [("MCR helps", "full", "wo_mcr", "eval/rsum", +1)]))
    assert "(full − wo_mcr on eval/rsum: +0 from one pair, no interval)" in claims
