"""The benchmarks' result shape on tiny real slices (correctness only; timings are not tested)."""
from __future__ import annotations

import os

import pytest

from bench import common
from bench import training as bench_training


def test_real_slice_is_balanced_real_films(shared_data):
    data = common.real_slice(shared_data, 6, "t")
    assert list(data.labels).count(0) == list(data.labels).count(1) == 6
    assert int(data.is_val.sum()) == 3  # every 5th of 12
    assert all(p.endswith(".jpeg") and "/chest_xray_224/train/" in p for p in data.paths)


def test_real_slice_missing_data_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="chest_xray_224/train/NORMAL"):
        common.real_slice(tmp_path, 2, "t")


def test_training_bench_on_cpu_measures_fp32_and_says_why_mixed_is_skipped(shared_data):
    out = bench_training.run(shared_data, per_class=5, epochs=2, batch_size=4)
    assert out["bench"] == "training" and out["recipe"] == "default224"
    assert out["gpus"] == 0 and out["device"] == "CPU only"
    base = out["baseline"]
    assert base["precision"] == "float32" and base["images_per_s"] > 0
    assert base["image_size"] == 224 and len(base["epoch_images_per_s"]) == 2
    assert out["ours"] is None and out["ratio"] is None and "no GPU" in out["skipped"]
    assert out["train_images"] + out["val_images"] == 10


@pytest.mark.slow
def test_training_bench_mixed_side_runs_and_ratio_is_ours_over_baseline(shared_data):
    out = bench_training.run(shared_data, per_class=4, epochs=2, batch_size=4, cpu_mixed=True)
    assert out["ours"]["precision"] == "mixed_float16"
    assert out["ratio"] == round(out["ours"]["images_per_s"] / out["baseline"]["images_per_s"], 2)
    assert "skipped" not in out


def test_training_bench_needs_two_epochs(shared_data):
    with pytest.raises(ValueError, match="at least 2"):
        bench_training.run(shared_data, epochs=1)


def test_report_renders_ratios_skips_and_errors():
    from bench import report

    info = {"cpu": "Test CPU", "cores": 2, "memory": "24 GiB", "gpus": [], "python": "3.11",
            "tensorflow": "2.x", "load_1min_at_start": 0.5}
    page = report.render([
        {"bench": "index", "ratio": 114.0, "baseline": {}, "ours": {}, "target": 50},
        {"bench": "features", "ratio": 1.43, "epoch_ratio": 19.8},
        {"bench": "training", "ratio": None, "skipped": "no GPU: reason",
         "baseline": {"images_per_s": 57.5}},
        {"bench": "pipeline", "ratio": 15.983010748133255},
        {"bench": "predict", "error": "boom"},
    ], info, "2026-11-23 00:00 UTC")
    assert "Test CPU, 2 cores, 24 GiB RAM, GPU: none" in page
    assert "| `index` |" in page and "**114.0×** (target ≥ 50)" in page
    assert "**1.4×**; per epoch 19.8×" in page and "**16.0×**" in page
    assert "— (no GPU: reason); float32 baseline 57.5 img/s" in page and "error: boom" in page
    assert page.count("```json") == 5


def test_a_partial_report_keeps_the_other_benches_results(tmp_path):
    from bench import report

    info = {"cpu": "Test CPU", "cores": 2, "memory": "24 GiB", "gpus": [], "python": "3.11",
            "tensorflow": "2.x", "load_1min_at_start": 0.5}
    page = tmp_path / "benchmarks.md"
    old = [{"bench": "index", "ratio": 114.0, "measured": "2026-11-23 02:15 UTC"},
           {"bench": "pages", "ratio": 2.0, "measured": "2026-11-23 02:15 UTC"}]
    page.write_text(report.render(old, info, "2026-11-23 02:15 UTC"))
    assert report.saved_results(page) == old
    merged = report.merge(report.saved_results(page),
                          [{"bench": "pages", "ratio": 3.04, "measured": "2026-12-03 12:30 UTC"}])
    assert [(r["bench"], r["ratio"]) for r in merged] == [("index", 114.0), ("pages", 3.04)]
    text = report.render(merged, info, "2026-12-03 12:30 UTC")
    assert "| `index` |" in text and "| 2026-11-23 02:15 UTC |" in text
    assert "**3.0×** | 2026-12-03 12:30 UTC |" in text
    assert report.saved_results(tmp_path / "absent.md") == []


def test_scale_bench_builds_the_asked_counts_and_every_page_renders(cxr_home, tmp_path,
                                                                    monkeypatch):
    from bench import report
    from bench import scale

    monkeypatch.delenv("CXR_ARTIFACTS", raising=False)  # build() drops it for its level
    built = scale.build(tmp_path / "data", cxr_home, 300, 600, 3)
    counts = built["counts"]
    assert counts["images"] == 300 and counts["relabels"] == 600
    assert 0 < counts["undo_rows"] < 60 and counts["relabelled_images"] < 300
    assert counts["runs"] == counts["evaluations"] == counts["operating_points"] == 3
    assert counts["eval_predictions"] == 3 * built["test_images"] > 0
    assert counts["comparable_groups"] == 1 and built["index_s"] > 0
    measured = scale.measure(cxr_home, reruns=1, repeat=1)
    assert set(measured["pages"]) == set(scale.PAGES)
    for page, r in measured["pages"].items():
        assert not r["exceptions"] and "harness_error" not in r, (page, r)
        assert r["first_s"] > 0 and r["rerun_s"] > 0 and r["title"], (page, r)
    assert set(measured["calls"]) == set(scale.DATA_CALLS)
    errors = {(p, c): v["error"] for p, calls in measured["calls"].items()
              for c, v in calls.items() if "error" in v}
    assert not errors, errors
    assert measured["rss_mb"] > 0
    out = scale.summarize({"300": {"build": built, **measured}})
    assert out["bench"] == "scale" and out["slowest_page"] in scale.PAGES
    assert set(out["goals"]) == {"page_under_1_5s", "data_under_1_5s", "growth_at_most_3x",
                                 "rss_under_1_5gb"}
    info = {"cpu": "Test CPU", "cores": 2, "memory": "24 GiB", "gpus": [], "python": "3.11",
            "tensorflow": "2.x", "load_1min_at_start": 0.5}
    page = report.render([out], info, "2026-12-03 00:00 UTC")
    assert "## Pages at scale" in page and "| review |" in page and "growth of the slowest" in page


def test_the_site_round_bench_runs_end_to_end_at_a_tiny_size(cxr_home, shared_data, tmp_path,
                                                             capsys):
    """bench site-round through the CLI: the shipped model as the base, a tiny next-round
    config, two folds, budgets 0 and 24; every figure on films never confirmed."""
    import json

    from cxr_core.cli import main

    site = tmp_path / "site"
    for cls in ("NORMAL", "PNEUMONIA"):
        (site / cls).mkdir(parents=True)
        for f in sorted((shared_data / "chest_xray_224_external" / cls).glob("*.jpeg"))[:30]:
            (site / cls / f.name).symlink_to(f)
    train = tmp_path / "ours" / "train"
    for cls in ("NORMAL", "PNEUMONIA"):
        (train / cls).mkdir(parents=True)
        files = sorted((shared_data / "chest_xray_224" / "train" / cls).glob("*.jpeg"))
        for f in files[::len(files) // 40][:40]:
            (train / cls / f.name).symlink_to(f)
    config = tmp_path / "next.json"
    config.write_text(json.dumps({
        "recipe": "cpu128", "dataset": str(train.parent), "model": "small3_50",
        "image_size": 32, "epochs": 1, "batch_size": 32, "augment": "zoom_shift"}))
    assert main(["bench", "site-round", "--site", str(site), "--config", str(config),
                 "--budgets", "0,24", "--folds", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["bench"] == "site-round" and out["base"] == "default" and out["folds"] == 2
    zero, some = out["budgets"]
    assert (zero["budget"], some["budget"]) == (0, 24)
    assert zero["n_scored"] == some["n_scored"] == 60  # every site film scored once a budget
    assert zero["next_crossfit"] == zero["base_crossfit"]  # budget 0: the next round is the base
    assert "refused" in zero["base_site"]  # nothing confirmed: no site threshold
    for key in ("base_stored", "next_own", "next_crossfit", "base_crossfit"):
        fig = some[key]
        assert 0 <= fig["specificity"] <= 1 and fig["specificity_ci"][0] <= fig["specificity"]
    assert "auc" in some["next_own"] and some["wall_s"] > 0
    assert out["baseline"]["budget"] == out["ours"]["budget"] == 24
    assert out["ratio"] == pytest.approx(out["ours"]["specificity"]
                                         / out["baseline"]["specificity"])
    from cxr_core.evaluation import site_round

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "site_round.json").write_text(json.dumps(out))
    got = site_round.measured(tmp_path / "model")  # what Compare's site section draws
    assert got.budgets == [0, 24] and got.folds == 2
    refused = [r for r in got.rows if r["refused"]]
    # budget 0 confirms nothing, so no site threshold; at 24 a tiny model may be refused too
    assert {"budget": 0, "key": "base_site"}.items() <= refused[0].items()
    assert all(r["specificity"] is None and r["key"] == "base_site" for r in refused)
    for budget, figs in zip(got.budgets, out["budgets"]):  # the bench's own reason, shown
        [row] = [r for r in got.rows if (r["budget"], r["key"]) == (budget, "base_site")]
        assert row["refused"] == figs["base_site"].get("refused")
    nxt = next(r for r in got.rows if (r["budget"], r["key"]) == (24, "next_crossfit"))
    assert nxt["specificity"] == some["next_crossfit"]["specificity"]
    assert nxt["low"] <= nxt["specificity"] <= nxt["high"]
    assert main(["bench", "site-round", "--budgets", "a,b"]) == 2
    assert "--budgets is a comma-separated list" in capsys.readouterr().err


@pytest.mark.slow
def test_the_label_noise_bench_runs_end_to_end_at_a_tiny_size(cxr_home, shared_data, tmp_path,
                                                              capsys):
    """bench label-noise through the CLI: a stratified real subset, a recorded flip, the audit
    (2 folds, a tiny model) against one in-sample run; every figure in [0, 1]."""
    import json

    from bench import report
    from cxr_core.cli import main

    config = tmp_path / "fold.json"
    config.write_text(json.dumps({"recipe": "cpu128", "model": "small3_50", "image_size": 32,
                                  "epochs": 1, "batch_size": 16, "augment": "none"}))
    assert main(["bench", "label-noise", "--flip", "0.1", "--images", "60", "--folds", "2",
                 "--config", str(config), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["bench"] == "label-noise" and out["folds"] == 2 and out["images"] == 60
    assert out["n_flipped"] == len(out["flipped"]) == 6
    assert all(f["true"] != f["given"] and f["path"].startswith(f"train/{f['given']}/")
               for f in out["flipped"])
    for side in ("baseline", "ours"):
        r = out[side]
        assert r["k"] == 6 and all(0.0 <= r[k] <= 1.0 for k in
                                   ("auroc", "precision", "recall", "precision_at_k"))
        assert r["wall_s"] > 0
    assert out["ratio"] is None or out["ratio"] == pytest.approx(
        out["ours"]["precision_at_k"] / out["baseline"]["precision_at_k"])
    text = "\n".join(report.label_noise_section(out))
    assert "| ours: label audit, 2 folds, out of fold |" in text
    assert "precision@k" in report._ratio(out) and "AUROC" in report._ratio(out)
    assert "—" in report._ratio({**out, "ratio": None})


def test_the_label_noise_bench_refuses_a_bad_flip(cxr_home, shared_data, capsys):
    from cxr_core.cli import main

    assert main(["bench", "label-noise", "--flip", "0.6", "--json"]) == 2
    assert "need 0 < flip < 0.5" in capsys.readouterr().err


def _site_round_result() -> dict:
    def fig(sens, spec, auc=None):
        out = {"sensitivity": sens, "specificity": spec, "specificity_ci": [spec - 0.05,
                                                                           min(1.0, spec + 0.05)],
               "sensitivity_ci": [sens - 0.03, min(1.0, sens + 0.03)], "accuracy": 0.9, "n": 201}
        return out | ({"auc": auc} if auc is not None else {})
    budgets = [{"budget": 0, "n_scored": 201, "base_stored": fig(0.97, 0.78, 0.972),
                "base_site": {"refused": "under 10 NORMAL films confirmed"},
                "base_crossfit": fig(0.95, 0.89), "next_own": fig(0.97, 0.78, 0.972),
                "next_crossfit": fig(0.95, 0.89), "wall_s": 3.0},
               {"budget": 50, "n_scored": 201, "base_stored": fig(0.97, 0.78, 0.972),
                "base_site": fig(0.93, 0.90), "base_crossfit": fig(0.95, 0.89),
                "next_own": fig(0.98, 0.80, 0.980), "next_crossfit": fig(0.95, 0.92),
                "wall_s": 700.0}]
    return {"bench": "site-round", "site": "chest_xray_224_external", "base": "default",
            "next_config": {"recipe": "robust128", "epochs": 6, "learning_rate": 2e-4,
                            "weights": "models/default/model.keras"},
            "folds": 2, "repeat": 3, "budgets": budgets,
            "baseline": {"what": "base at its stored threshold", "budget": 50,
                         **budgets[1]["base_stored"]},
            "ours": {"what": "next round at a cross-fitted site threshold", "budget": 50,
                     **budgets[1]["next_crossfit"]},
            "ratio": 0.92 / 0.78, "wall_s": 1500.0}


def test_the_site_round_section_tabulates_every_budget_and_rule():
    from bench import report

    out = _site_round_result()
    text = "\n".join(report.site_round_section(out, plot="site_round.png"))
    assert text.startswith("\n## Site round") and "fine-tuned from the base" in text
    rows = [line for line in text.splitlines() if line.startswith(("| 0 |", "| 50 |"))]
    assert len(rows) == 2
    assert "refused (1)" in rows[0] and "1. under 10 NORMAL films confirmed" in text
    assert "0.950 / **0.920** [0.870, 0.970]" in rows[1]  # next round, cross-fitted
    assert "0.972 / 0.980" in rows[1] and "| 700 |" in rows[1]
    assert "![specificity at sensitivity 0.95 against films confirmed](site_round.png)" in text
    noted = {**out, "base_threshold": {"value": 0.155, "stored": 0.422,
                                       "note": "the stored threshold 0.422 was chosen on it"}}
    lines = report.site_round_section(noted)
    assert "Baseline: the stored threshold 0.422 was chosen on it." in lines
    assert lines.index("Baseline: the stored threshold 0.422 was chosen on it.") < next(
        i for i, line in enumerate(lines) if line.startswith("| films confirmed"))
    assert "1.18×" in report._ratio(out) and "after 50 films" in report._ratio(out)
    page = report.render([out], {"cpu": "x", "cores": 2, "memory": "1 GB", "gpus": [],
                                 "python": "3.11", "tensorflow": "2", "load_1min_at_start": 0},
                         "2026-12-07 00:00 UTC", plot="site_round.png")
    assert "## Site round" in page and '"bench": "site-round"' in page  # raw JSON kept below


def test_the_site_round_plot_is_drawn_in_chromium(tmp_path):
    import shutil

    from bench import report

    if shutil.which("chromium") is None:
        if os.environ.get("CXR_REQUIRE_BROWSER"):
            pytest.fail("CXR_REQUIRE_BROWSER is set but chromium is not on PATH")
        pytest.skip("no chromium (apt-get install chromium)")
    from PIL import Image

    out = tmp_path / "site_round.png"
    assert report.site_round_plot(_site_round_result(), out) is None
    with Image.open(out) as im:
        assert im.size[0] >= 800 and im.size[1] >= 400
        assert len(set(im.convert("RGB").getdata())) > 20  # lines, markers, text: not blank


def test_a_measured_site_round_is_merged_into_the_page_without_rerunning(tmp_path, monkeypatch):
    import json

    from bench import report

    monkeypatch.setattr(report, "run_bench", lambda *a: pytest.fail("no bench may run"))
    monkeypatch.setattr(report, "site_round_plot", lambda result, out: "no browser here")
    monkeypatch.setattr(report, "machine", lambda: {
        "cpu": "x", "cores": 2, "memory": "1 GB", "gpus": [], "python": "3.11",
        "tensorflow": "2", "load_1min_at_start": 0})
    page = tmp_path / "benchmarks.md"
    page.write_text(report.render([{"bench": "index", "ratio": 3.0, "measured": "earlier"}],
                                  report.machine(), "earlier"))
    saved = tmp_path / "site_round.json"
    saved.write_text(json.dumps(_site_round_result()) + "\n")
    assert report.main(["--out", str(page), "--merge-json", str(saved)]) == 0
    kept = report.saved_results(page)
    assert [r["bench"] for r in kept] == ["index", "site-round"]
    assert kept[1]["budgets"] == _site_round_result()["budgets"]
    text = page.read_text()
    assert "## Site round" in text and "](site_round.png)" not in text  # no picture drawn
    # --from-json: only the given results, re-rendered (the index row is gone)
    assert report.main(["--out", str(page), "--from-json", str(saved)]) == 0
    assert [r["bench"] for r in report.saved_results(page)] == ["site-round"]


def test_the_site_rounds_baseline_never_stands_at_a_threshold_chosen_on_the_site():
    """The shipped card's stored threshold was chosen on the external sample: a site round there
    (chosen here: cxr_core.evaluation.external.stored_threshold_chosen_here, tested in
    test_external) starts the base at its own calibration threshold and says so; elsewhere,
    the stored one."""
    import json
    from pathlib import Path

    from bench.site_round import baseline_threshold

    card = json.loads((Path(__file__).parents[1] / "models" / "default" /
                       "model_card.json").read_text())
    op = card["operating_point"]
    assert op["chosen_on"] == "site" and op["dataset"] == "chest_xray_224_external"
    thr, note = baseline_threshold(op, op["threshold"], chosen_here=True)
    assert thr == op["global_threshold"] != op["threshold"]
    assert "chosen on this site's films" in note and f"{op['threshold']:.3f}" in note
    assert baseline_threshold(op, op["threshold"], chosen_here=False) == (op["threshold"], None)
    assert baseline_threshold({"chosen_on": "calibration", "threshold": 0.3}, 0.3,
                              chosen_here=False) == (0.3, None)
    assert baseline_threshold(None, 0.5, chosen_here=False) == (0.5, None)
    # chosen here with no earlier threshold recorded: stays, and the note says it is resubstituted
    thr, note = baseline_threshold({"chosen_on": "site", "dataset": "s"}, 0.4, chosen_here=True)
    assert thr == 0.4 and "scored on the films its threshold was chosen on" in note
