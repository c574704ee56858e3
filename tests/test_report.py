"""Report: curves across runs, token-credit heatmap colours, renders in headless Chromium."""

import json
import os
import shutil
import subprocess

import pytest

from sgcd_jax.metrics_log import MetricsLogger, read_metrics
from sgcd_jax.report import _colour, build_report, heatmap_html, write_samples


def fake_run(root, name, slope):
    run_dir = os.path.join(root, name)
    logger = MetricsLogger(run_dir, tensorboard=False)
    for step in range(1, 6):
        logger.log(step, {"success_rate": slope * step, "reward_mean": slope * step, "loss": 0.1,
                          "state_change_success_rate": 0.5 * slope * step})
    logger.log(5, {"success_rate": slope * 4, "state_change_success_rate": slope}, phase="eval")
    logger.close()
    write_samples(run_dir, [{"title": "task 1 sibling 0", "reward": 0.0, "advantage": -0.87,
                             "tokens": ["<|im_start|>", "assistant", "<tool_call>", "cancel", "_reservation", "<"],
                             "loss_mask": [0, 0, 1, 1, 1, 1], "weights": [1, 1, 0.6, 1.8, 1.0, 1.2],
                             "reference": "step 0: fatal — cancelled a non-refundable booking"}])
    return run_dir


def test_heatmap_colours_tokens_by_weight_and_shows_the_reference():
    assert _colour(2.0, 1.0) == "rgb(255,0,0)"  # up-weighted: red
    assert _colour(0.0, 1.0) == "rgb(0,0,255)"  # down-weighted: blue
    assert _colour(1.0, 1.0) == "rgb(255,255,255)"
    html = heatmap_html({"title": "t", "tokens": ["a", "b", "c"], "loss_mask": [0, 1, 1], "weights": [1, 0.5, 1.5],
                         "reference": "step 0: harmful <x>"})
    assert 'title="w=0.500"' in html and 'title="w=1.500"' in html
    assert html.count('class="tok"') == 2 and html.count('class="ctx"') == 1  # prompt token not coloured
    assert "step 0: harmful &lt;x&gt;" in html  # reference rendered, escaped


def test_report_compares_runs_and_writes_pngs(tmp_path):
    runs = [fake_run(str(tmp_path), "grpo", 0.1), fake_run(str(tmp_path), "sgcd", 0.15)]
    path = build_report(runs, str(tmp_path / "cmp"))
    html = open(path).read()
    assert "train_success_rate.png" in html and "eval_success_rate.png" in html
    # the second comparison curve, on the bare student as well as in training
    assert "eval_state_change_success_rate.png" in html and "train_state_change_success_rate.png" in html
    assert "eval state_change_success_rate (final)" in html
    assert os.path.getsize(tmp_path / "cmp" / "train_success_rate.png") > 1000
    assert "grpo" in html and "sgcd" in html and "cancelled a non-refundable booking" in html
    # binary rewards: train reward repeats train success, so its plot is dropped
    assert "train_reward_mean.png" not in html and not os.path.exists(tmp_path / "cmp" / "train_reward_mean.png")
    assert "± 0.000" not in html  # one run per label: its value, no fake spread


def test_reward_curve_kept_when_it_differs_from_success(tmp_path):
    run_dir = os.path.join(tmp_path, "r")
    logger = MetricsLogger(run_dir, tensorboard=False)
    for step in range(1, 4):
        logger.log(step, {"success_rate": 0.1 * step, "reward_mean": 0.1 * step + 0.05})
    logger.close()
    assert "train_reward_mean.png" in open(build_report([run_dir])).read()


def test_credit_curve_skips_iterations_without_a_mixed_group(tmp_path):
    from sgcd_jax.report import _series

    logger = MetricsLogger(str(tmp_path), tensorboard=False)
    for step, value in ((1, 1.0), (2, float("nan")), (3, 0.98)):  # NaN: no counted token at step 2
        logger.log(step, {"credit/weight_mean": value})
    logger.close()
    steps, values = _series(read_metrics(str(tmp_path)), "credit/weight_mean", "train")
    assert steps.tolist() == [1, 3] and values.tolist() == [1.0, 0.98]


def test_mixed_pair_side_by_side_with_legend_iteration_and_decisive_step(tmp_path):
    from sgcd_jax.report import heatmap_pair_html

    def sample(reward, decisive):
        return {"title": f"t sibling {int(reward)}", "reward": reward, "advantage": reward - 0.5, "iteration": 7,
                "tokens": ["u", "a", "b", "c"], "loss_mask": [0, 1, 1, 1], "weights": [1, 1.2, 0.8, 1.0],
                "decisive": decisive, "truth": "env turn 1: reply_missing_info (no reply communicates Gold)"}
    html = heatmap_pair_html([sample(1.0, [0, 0, 1, 0]), sample(0.0, [0, 0, 0, 1])])
    assert html.count('class="cell"') == 2 and "red: w &gt; 1" in html and "blue: w &lt; 1" in html
    assert "iteration 7 · success" in html and "iteration 7 · failure" in html
    assert html.count('class="tok dec"') == 2  # one decisive token per sample, marked
    assert "reply_missing_info" in html


def test_resumed_logger_drops_steps_that_will_be_recomputed(tmp_path):
    logger = MetricsLogger(str(tmp_path), tensorboard=False)
    for step in range(1, 5):
        logger.log(step, {"x": step})
    logger.close()
    logger = MetricsLogger(str(tmp_path), tensorboard=False, resume_step=3)
    logger.log(3, {"x": 30})
    logger.close()
    assert [(r["step"], r["x"]) for r in read_metrics(str(tmp_path))] == [(1, 1), (2, 2), (3, 30)]


def test_report_renders_in_headless_chromium(tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no Chromium on this machine (apt-get install -y chromium); the report HTML itself is "
                    "checked by the other tests")
    run_dir = fake_run(str(tmp_path), "sgcd", 0.1)
    path = build_report([run_dir])
    shot = tmp_path / "shot.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1200,900", f"file://{os.path.abspath(path)}"], check=True, timeout=60,
                   capture_output=True)
    assert shot.exists() and shot.stat().st_size > 10_000  # a blank page is ~5 kB
    _ = json  # noqa


def test_memory_metrics_count_the_arrays_a_process_holds():
    import jax.numpy as jnp

    from sgcd_jax.trainer.trainer import memory_metrics

    before = memory_metrics("a")["memory/live_arrays_gb_a"]
    held = jnp.ones((64, 1024, 1024), jnp.float32)  # 0.27 GB
    after = memory_metrics("b")
    assert after["memory/live_arrays_gb_b"] - before >= 0.26
    assert after["memory/peak_rss_gb"] >= after["memory/rss_gb_b"] >= 0.26
    # A second array viewing the same buffer (a shard's .data, as orbax's save takes) is not counted twice:
    # summing nbytes over jax.live_arrays() reported SmolLM2's 1.6 GB state as 3.2 GB after a checkpoint.
    view = held.addressable_shards[0].data
    assert view.unsafe_buffer_pointer() == held.unsafe_buffer_pointer()
    again = memory_metrics("c")["memory/live_arrays_gb_c"]
    assert abs(again - after["memory/live_arrays_gb_b"]) < 0.01
    del held, view
