"""Comparison statistics (sgcd_jax/stats.py): t intervals against hand-computed values and the t density
integrated numerically, the eval-curve area, and the compare table over fake runs' metrics."""

import math

import pytest

from sgcd_jax import stats
from sgcd_jax.metrics_log import MetricsLogger, read_metrics


def test_t_interval_matches_hand_values_and_the_t_distribution():
    mean, half = stats.mean_ci([0.0, 1.0])  # s = 0.7071, t(0.975, 1) = 12.706: half = 12.706 * 0.7071 / 1.4142
    assert mean == 0.5 and half == pytest.approx(6.353, abs=1e-3)
    values = [0.2, 0.35, 0.3, 0.25, 0.4]
    mean, half = stats.mean_ci(values)
    s = math.sqrt(sum((v - 0.3) ** 2 for v in values) / 4)
    assert mean == pytest.approx(0.3) and half == pytest.approx(stats.t975(4) * s / math.sqrt(5))
    for df in (1, 2, 4, 10, 29):  # the table against the t density integrated numerically
        assert _t_cdf(stats.t975(df), df) == pytest.approx(0.975, abs=2e-5), df
    for df in (31, 40, 200):  # the expansion beyond the table (1.96 alone gave 0.9715 at df=40)
        assert _t_cdf(stats.t975(df), df) == pytest.approx(0.975, abs=2e-5), df
    assert math.isnan(stats.mean_ci([0.4])[1]) and stats.fmt_ci([0.4]) == "0.400"  # one run: no fake "± 0"
    assert stats.fmt_ci([float("nan")]) == "–"
    with pytest.raises(ValueError, match="at least 2 runs"):
        stats.t975(0)


def _t_cdf(x: float, df: int, n: int = 20_000) -> float:
    """Student t cdf by midpoint integration of its density from 0 (it is symmetric)."""
    c = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))
    h = x / n
    return 0.5 + sum(c * (1 + ((i + 0.5) * h) ** 2 / df) ** (-(df + 1) / 2) for i in range(n)) * h


def test_curve_auc_is_the_mean_height():
    assert stats.curve_auc([0, 5, 10, 15, 20], [0.3] * 5) == pytest.approx(0.3)
    assert stats.curve_auc([0, 20], [0.0, 1.0]) == pytest.approx(0.5)
    # an early riser has more area than a late one with the same final value
    assert stats.curve_auc([0, 5, 10], [0.0, 0.3, 0.3]) > stats.curve_auc([0, 5, 10], [0.0, 0.0, 0.3])
    assert stats.curve_auc([5], [0.2]) == 0.2 and math.isnan(stats.curve_auc([], []))


def test_comparison_table_over_runs(tmp_path):
    summaries = {}
    for method, rise in (("grpo", 0.1), ("sgcd", 0.2)):
        runs = []
        for seed in range(3):
            logger = MetricsLogger(str(tmp_path / f"{method}_{seed}"), tensorboard=False)
            for step in (0, 5, 10):
                logger.log(step, {"success_rate": rise * step / 10 + 0.01 * seed}, phase="eval")
            logger.log(1, {"credit/localization_auroc": 0.5 + rise + 0.01 * seed})
            logger.log(2, {"credit/localization_auroc": float("nan")})  # no mixed group: ignored, not 0
            logger.close()
            runs.append(stats.run_summary(read_metrics(str(tmp_path / f"{method}_{seed}"))))
        summaries[method] = runs
    header, rows = stats.comparison_table(summaries)
    assert header[:6] == ["method", "runs", "eval @0", "eval @5", "eval @10", "eval AUC"]
    grpo = dict(zip(header, rows[0]))
    # seeds add 0, 0.01, 0.02: mean +0.01, s = 0.01, half = t(0.975, 2) * 0.01 / sqrt(3) = 0.0248
    assert grpo["eval @10"] == "0.110 ± 0.025" and grpo["localization AUROC (token)"] == "0.610 ± 0.025"
    assert grpo["(step)"] == "–" and grpo["teacher log-ratio decisive / other"] == "–"  # not logged here
    assert grpo["eval AUC"] == "0.060 ± 0.025"  # mean height of 0 -> 0.05 -> 0.1, + 0.01
    assert "| sgcd | 3 |" in stats.markdown(header, rows)


def test_stored_localization_scores_every_method_from_its_rollout_store(tmp_path):
    """From the store: credit weights where the run had them, 1 (exactly ½) where it had none (GRPO)."""
    import numpy as np

    from sgcd_jax.data.store import RolloutStore

    step_ids = np.array([[-1, 0, 0, -1, 1, 1, 1], [-1, 0, 0, -1, 1, 1, 1]])
    mask = (step_ids >= 0).astype(np.int8)
    for name, weights in (("sgcd", np.where(step_ids == 1, 1.5, 0.8)), ("grpo", None)):
        store = RolloutStore(str(tmp_path / name / "rollouts"), 0)
        tokens = {"token_ids": np.ones_like(step_ids), "loss_mask": mask, "step_ids": step_ids}
        if weights is not None:
            tokens["credit_weights"] = weights.astype(np.float32)
        store.append(1, task_ids=["t", "t"], group_ids=["g", "g"], lengths=[7, 7], tokens=tokens,
                     rewards=[1.0, 0.0], advantages=[1.0, -1.0], attrs={"decisive_steps": [[1], [1]]})
        store.append(2, task_ids=["t"], group_ids=["h"], lengths=[7], tokens={k: v[:1] for k, v in tokens.items()},
                     rewards=[1.0], advantages=[0.0], attrs={"decisive_steps": [[1]]})  # not mixed: no row
    sgcd = stats.stored_localization(str(tmp_path / "sgcd"))
    assert sgcd["credit/localization_auroc"] == 1.0 and sgcd["credit/localization_auroc_step"] == 1.0
    assert sgcd["credit/weight_decisive"] == pytest.approx(1.5) and "teacher/log_ratio_decisive" not in sgcd
    grpo = stats.stored_localization(str(tmp_path / "grpo"))
    assert grpo["credit/localization_auroc"] == 0.5 and grpo["credit/weight_other"] == 1.0
    assert stats.stored_localization(str(tmp_path / "none")) == {}


def test_compare_merges_an_earlier_comparisons_runs(tmp_path):
    """Seeds measured earlier (their compare.json) and a seed run now form one table and one plot; a run
    measured now replaces a merged one of the same name."""
    import json

    from sgcd_jax import compare

    out = tmp_path / "now"
    logger = MetricsLogger(str(out / "grpo_s2"), tensorboard=False)
    for step, value in ((0, 0.0), (5, 0.3)):
        logger.log(step, {"success_rate": value}, phase="eval")
    logger.close()
    earlier = {"runs": {"grpo": {f"grpo_s{s}": {"eval_success": {"0": 0.0, "5": 0.1 * s}, "eval_auc": 0.05 * s,
                                                "credit/localization_auroc": 0.5, "credit/localization_auroc_step": 0.5,
                                                "teacher/log_ratio_decisive": 0.0, "teacher/log_ratio_other": 0.0}
                                 for s in (0, 1, 2)},
                        "sgcd": {"sgcd_s0": {"eval_success": {"0": 1.0}}}}}  # a method not asked for: left out
    (tmp_path / "earlier.json").write_text(json.dumps(earlier))
    compare.main(["--methods", "grpo", "--seeds", "2", "--out", str(out), "--table_only",
                  "--merge", str(tmp_path / "earlier.json")])
    result = json.loads((out / "compare.json").read_text())
    assert sorted(result["runs"]) == ["grpo"] and sorted(result["runs"]["grpo"]) == ["grpo_s0", "grpo_s1", "grpo_s2"]
    assert result["runs"]["grpo"]["grpo_s2"]["eval_success"] == {"0": 0.0, "5": 0.3}  # measured now, not merged
    table = (out / "compare.md").read_text()
    # eval @5 over 0.0, 0.1, 0.3: mean 0.133, s = 0.153, half = 4.303 * 0.153 / sqrt(3) = 0.379
    assert "seeds [0, 1, 2]" in table and "| grpo | 3 | 0.000 ± 0.000 | 0.133 ± 0.379 |" in table
    assert (out / "compare_eval_success.png").stat().st_size > 1000
