"""Runs every benchmark (each in its own process) and writes ``docs/benchmarks.md``.

Run: ``python -m bench.report [--only NAME ...] [--out docs/benchmarks.md]``. Each bench's JSON
is kept verbatim in the page, with the machine it ran on and how busy it was.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from cxr_core.cli import BENCHES

REPO = Path(__file__).resolve().parents[1]
WHAT = {
    "index": "re-open of the indexed train split vs its first scan",
    "pages": "first visit of Home, Class balance, Train, Compare, Review (fresh process) vs "
             "the same with TensorFlow imported at load",
    "pipeline": "decode-once tf.data cache vs `image_dataset_from_directory`, full-res films",
    "features": "frozen-backbone epochs on cached features vs recomputing the backbone",
    "predict": "warm model + Grad-CAM vs loading the model per request",
    "training": "default224 training throughput, mixed precision vs float32 (GPU only)",
    "scale": "every page's data at 100k images / 200k relabels / 20 evaluations vs the same "
             "at 5k (growth of the slowest page; goals: < 1.5 s, ≤ 3×, RSS < 1.5 GB)",
    "label-noise": "flipped labels found by the label audit (out-of-fold confident learning) "
                   "vs one model's in-sample scores (precision at k = number flipped; goals: "
                   "AUROC ≥ 0.90, precision@k ≥ 0.6)",
    "site-round": "a new site's next round (the base plus the films confirmed on Review) at a "
                  "cross-fitted site threshold vs the base at its threshold before the site, on "
                  "films no one confirmed (specificity, aiming at sensitivity 0.95)",
}
SITE_ROUND_PLOT = "site_round.png"  # beside the page: specificity against films confirmed


def machine() -> dict:
    """What the numbers were measured on."""
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem_kb = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text()
                          .splitlines() if line.startswith("MemTotal")))
        memory = f"{mem_kb / 2**20:.0f} GiB"
    except (OSError, StopIteration, ValueError):
        memory = "unknown"
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    return {"cpu": cpu, "cores": os.cpu_count(), "memory": memory,
            "gpus": [tf.config.experimental.get_device_details(g).get("device_name", g.name)
                     for g in gpus],
            "python": platform.python_version(), "tensorflow": tf.__version__,
            "load_1min_at_start": round(load, 2)}


def run_bench(name: str, data: str | None) -> dict:
    cmd = [sys.executable, "-m", "cxr_core", "bench", name, "--json"]
    if data:
        cmd += ["--data", data]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"bench": name, "error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _ratio(result: dict) -> str:
    if "error" in result:
        return f"error: {result['error']}"
    if result.get("bench") == "scale" and "levels" in result:
        goals = result.get("goals", {})
        ok = ", ".join(f"{k} {'✓' if v else '✗'}" for k, v in goals.items())
        growth = "—" if result.get("ratio") is None else f"**{float(result['ratio']):.1f}×**"
        return (f"{growth} growth of the slowest page ({result.get('slowest_page')}, "
                f"{result.get('slowest_page_s') or float('nan'):.2f} s); goals: {ok}")
    if result.get("bench") == "label-noise" and "ours" in result:
        ours = result["ours"]
        ratio = "—" if result.get("ratio") is None else f"**{float(result['ratio']):.1f}×**"
        return (f"{ratio} precision@k ({ours['precision_at_k']:.2f} vs "
                f"{result['baseline']['precision_at_k']:.2f}); AUROC {ours['auroc']:.3f}; goals "
                + ("met" if result.get("met") else "not met"))
    if result.get("bench") == "site-round" and "ours" in result:
        ours, base = result["ours"], result["baseline"]
        ratio = "—" if result.get("ratio") is None else f"**{float(result['ratio']):.2f}×**"
        return (f"{ratio} specificity after {ours['budget']} films confirmed "
                f"({ours['specificity']:.3f} at sensitivity {ours['sensitivity']:.3f} vs "
                f"{base['specificity']:.3f} at {base['sensitivity']:.3f})")
    if result.get("ratio") is None:
        base = result.get("baseline") or {}
        measured = (f"; float32 baseline {base['images_per_s']:g} img/s"
                    if "images_per_s" in base else "")
        return f"— ({result.get('skipped', 'not measured')}){measured}"
    text = f"**{float(result['ratio']):.1f}×**"
    if "epoch_ratio" in result:
        text += f"; per epoch {float(result['epoch_ratio']):.1f}×"
    if "target" in result:
        text += f" (target ≥ {result['target']:g})"
    return text


def render(results: list[dict], info: dict, when: str, plot: str | None = None) -> str:
    """The page. ``plot``: the site round's picture (relative to the page), if one was drawn."""
    gpus = ", ".join(info["gpus"]) or "none"
    lines = [
        "# Benchmarks",
        "",
        "Each benchmark prints a ratio against a baseline measured in the same run "
        "(`python -m cxr_core bench NAME --json`). This page is written by "
        "`python -m bench.report`.",
        "",
        f"- latest run: {when} (a partial run, `--only`, keeps the other benches' earlier "
        "results; the table says when each was measured)",
        f"- machine: {info['cpu']}, {info['cores']} cores, {info['memory']} RAM, GPU: {gpus}",
        f"- software: Python {info['python']}, TensorFlow {info['tensorflow']}",
        f"- 1-minute load average when it started: {info['load_1min_at_start']} "
        "(other work on the same cores lowers the ratios of the CPU-bound benches)",
        "",
        "| bench | what is compared | ratio | measured |",
        "|---|---|---|---|",
    ]
    lines += [f"| `{r['bench']}` | {WHAT.get(r['bench'], '')} | {_ratio(r)} | "
              f"{r.get('measured', when)} |" for r in results]
    pages = next((r for r in results if r["bench"] == "pages" and "ours" in r), None)
    if pages:
        lines += ["", "## First visit of each page", "",
                  "Seconds from a fresh interpreter to the page rendered (entry point + page, "
                  f"median of {pages.get('repeat', 1)}), against a database holding "
                  f"{pages.get('images', '?')} indexed films. Pages that imported TensorFlow "
                  f"on their own: {', '.join(pages.get('tensorflow_at_load') or []) or 'none'}.",
                  "", "| page | now (s) | with TensorFlow at load (s) | ratio |", "|---|---|---|---|"]
        lines += [f"| {p} | {pages['ours'][p]:.2f} | {pages['baseline'][p]:.2f} | "
                  f"{pages['per_page_ratio'][p]:.1f}× |" for p in pages["ours"]]
    scale = next((r for r in results if r["bench"] == "scale" and "levels" in r), None)
    if scale:
        lines += scale_section(scale)
    noise = next((r for r in results if r["bench"] == "label-noise" and "ours" in r), None)
    if noise:
        lines += label_noise_section(noise)
    site = next((r for r in results if r["bench"] == "site-round" and "budgets" in r), None)
    if site:
        lines += site_round_section(site, plot=plot)
    lines += ["", "## Raw results", ""]
    for r in results:
        lines += [f"### {r['bench']}", "", "```json", json.dumps(r, indent=1), "```", ""]
    return "\n".join(lines)


def scale_section(result: dict) -> list[str]:
    """Per page and level: first render (data caches empty), rerun, the page's data calls
    and the growth from the smallest level to the largest; then build times and RSS."""
    sizes = [str(n) for n in result.get("sizes") or result["levels"]]
    levels = result["levels"]

    def num(v, fmt=".2f"):
        return "—" if v is None else format(v, fmt)
    head = " | ".join(f"{int(n):,}: first / rerun / data (s)" for n in sizes)
    lines = ["", "## Pages at scale", "",
             "Each level is built in a temp dir (tiny generated PNGs, the real indexer, 2 "
             "relabels per image, 20 evaluations of the test split) and measured in a fresh "
             "web process (`CXR_WORKER=off`): the first `AppTest` render of a page with empty "
             "data caches, the median rerun (a click), and the sum of the cxr_core calls the "
             "page makes.", "",
             f"| page | {head} | growth (first render) |",
             "|---|" + "---|" * len(sizes) + "---|"]
    for page in levels[sizes[-1]]["pages"]:
        cells = []
        for n in sizes:
            r = levels[n]["pages"].get(page, {})
            data = (levels[n].get("data_s") or {}).get(page)
            bad = " ⚠" if r.get("exceptions") or r.get("harness_error") else ""
            cells.append(f"{num(r.get('first_s'))} / {num(r.get('rerun_s'))} / "
                         f"{num(data, '.3f')}{bad}")
        g = (result.get("growth") or {}).get(page)
        lines.append(f"| {page} | {' | '.join(cells)} | {num(g, '.1f')}× |")
    lines += ["", "| level | images | build (s) | index (s) | relabels (s) | evaluations (s) "
              "| DB (MB) | RSS after renders (MB) |", "|---|---|---|---|---|---|---|---|"]
    for n in sizes:
        b = levels[n].get("build", {})
        lines.append(f"| {int(n):,} | {b.get('counts', {}).get('images', '?')} | "
                     f"{num(b.get('total_s'), '.1f')} | {num(b.get('index_s'), '.1f')} | "
                     f"{num(b.get('relabels_s'), '.1f')} | {num(b.get('evals_s'), '.1f')} | "
                     f"{num(b.get('db_mb'), '.0f')} | {num(levels[n].get('rss_mb'), '.0f')} |")
    return lines


def label_noise_section(result: dict) -> list[str]:
    """The label audit against the in-sample baseline on films with known flipped labels."""
    cfg = result.get("config") or {}
    rows = [("baseline: one run, in-sample scores", result["baseline"]),
            (f"ours: label audit, {result['folds']} folds, out of fold", result["ours"])]
    lines = ["", "## Label noise found by the label audit", "",
             f"{result['images']:,} real train films (stratified by class, seed "
             f"{result.get('seed', 0)}), {result['n_flipped']} of them ({result['flip']:.0%}) "
             "moved to the other class's folder (recorded in the raw result); the fold runs' "
             f"config: `{cfg.get('model')}` at {cfg.get('image_size')} px, "
             f"{cfg.get('epochs')} epochs max, augment `{cfg.get('augment')}`. Detection AUROC "
             "ranks every film by 1 − P(given label); the flagged set is confident learning's; "
             "precision@k takes the k lowest self-confidences, k = the number flipped.", "",
             "| | detection AUROC | flagged | precision | recall | precision@k | wall (s) |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {name} | {r['auroc']:.3f} | {r['n_flagged']} | {r['precision']:.2f} | "
              f"{r['recall']:.2f} | {r['precision_at_k']:.2f} | {r['wall_s']:.0f} |"
              for name, r in rows]
    goals = result.get("goals") or {}
    lines += ["", f"Goals: AUROC ≥ {goals.get('auroc')}, precision@k ≥ "
              f"{goals.get('precision_at_k')}: {'met' if result.get('met') else 'not met'}. "
              f"Out-of-fold AUC of the folds (NORMAL vs PNEUMONIA, noisy labels): "
              f"{result['ours'].get('oof_auc') or float('nan'):.3f}."]
    return lines


def site_round_section(result: dict, plot: str | None = None) -> list[str]:
    """The site round per review budget: each decision rule's sensitivity / specificity (95%
    patient-clustered interval) on the films no one confirmed, and the picture if drawn."""
    from cxr_core.evaluation.site_round import series

    legends = series(result)
    refusals: list[str] = []

    def cell(fig: dict | None) -> str:
        if not isinstance(fig, dict):
            return "—"
        if fig.get("refused"):
            refusals.append(f"{len(refusals) + 1}. {fig['refused']}")
            return f"refused ({len(refusals)})"
        lo, hi = fig.get("specificity_ci") or [float("nan")] * 2
        return f"{fig['sensitivity']:.3f} / **{fig['specificity']:.3f}** [{lo:.3f}, {hi:.3f}]"

    cfg = result.get("next_config") or {}
    note = (result.get("base_threshold") or {}).get("note")
    lines = ["", "## Site round", "",
             f"What a new site gains from confirming films on Review and training the next "
             f"round on them (`python -m cxr_core bench site-round`; steps (a)–(e) of "
             f"`bench/site_round.py`). Site: `{result.get('site')}`; base: "
             f"`{result.get('base')}`; {result.get('folds')} patient-grouped folds over the "
             "site's patients: each fold's films are scored only by models and thresholds that "
             "never saw them (the other folds are the review pool, confirmed in Review's "
             "new-site queue order, the folder labels standing in for the reader). The next "
             f"round: recipe `{cfg.get('recipe')}`, {cfg.get('epochs')} epochs, learning rate "
             f"{cfg.get('learning_rate')}, "
             + ("fine-tuned from the base" if cfg.get("weights") else "from scratch")
             + f", each confirmed film repeated {result.get('repeat')}× per epoch. Cells: "
             "sensitivity / **specificity** [95% interval of the specificity], thresholds "
             "aiming at sensitivity 0.95. Whole bench: "
             f"{float(result.get('wall_s') or 0) / 60:.0f} min.", "",
             *([f"Baseline: {note}.", ""] if note else []),
             "| films confirmed | " + " | ".join(legends.values())
             + " | AUC base / next round | wall (s) |",
             "|---|" + "---|" * (len(legends) + 2)]
    for entry in result["budgets"]:
        auc_next = (entry.get("next_own") or {}).get("auc")
        auc_base = (entry.get("base_stored") or {}).get("auc")
        aucs = " / ".join("—" if a is None else f"{a:.3f}" for a in (auc_base, auc_next))
        lines.append(f"| {entry['budget']} | "
                     + " | ".join(cell(entry.get(k)) for k in legends)
                     + f" | {aucs} | {entry.get('wall_s', 0):.0f} |")
    if refusals:
        lines += ["", "Refused site thresholds:", "", *refusals]
    if plot:
        lines += ["", f"![specificity at sensitivity 0.95 against films confirmed]({plot})"]
    lines += ["", "The same picture is on Compare → Site threshold (read from "
              "`models/default/site_round.json`)."]
    return lines


def site_round_plot(result: dict, out: Path) -> str | None:
    """Draw the site round (:func:`cxr_core.evaluation.site_round.figure`, the picture Compare
    shows) to ``out`` as PNG in Debian's Chromium through Playwright. Returns why not, or None
    when written."""
    import shutil
    import tempfile

    from cxr_core.evaluation.site_round import figure, parse

    chromium = shutil.which("chromium")
    if chromium is None:
        return "no chromium on PATH (apt-get install chromium)"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return "playwright is not installed (requirements-dev.txt)"
    fig = figure(parse(result))
    fig.update_layout(width=900, height=480, legend={"orientation": "h", "y": -0.25})
    with tempfile.TemporaryDirectory() as tmp:
        html = Path(tmp) / "plot.html"
        fig.write_html(html, include_plotlyjs=True, full_html=True)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium)
            page = browser.new_page(viewport={"width": 920, "height": 500})
            page.goto(html.as_uri())
            page.wait_for_selector(".main-svg")
            page.locator(".plotly-graph-div").screenshot(path=str(out))
            browser.close()
    return None


def saved_results(page: Path) -> list[dict]:
    """The raw results kept in a page :func:`render` wrote (none if there is no page)."""
    try:
        text = page.read_text()
    except OSError:
        return []
    blocks = text.split("```json\n")[1:]
    return [json.loads(block.split("\n```", 1)[0]) for block in blocks]


def merge(earlier: list[dict], new: list[dict]) -> list[dict]:
    """``new`` replaces the earlier result of the same bench; order follows ``BENCHES``."""
    by_name = {r["bench"]: r for r in earlier} | {r["bench"]: r for r in new}
    return [by_name[n] for n in BENCHES if n in by_name]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=BENCHES, default=list(BENCHES))
    parser.add_argument("--data", default=None, help="the shared data folder")
    parser.add_argument("--out", default=str(REPO / "docs" / "benchmarks.md"))
    parser.add_argument("--from-json", default=None,
                        help="re-render saved results (one JSON object per line) instead")
    parser.add_argument("--merge-json", default=None,
                        help="add results measured earlier (one bench's JSON object per line, "
                             "e.g. a long site-round run) to the page instead of running benches")
    args = parser.parse_args(argv)
    info = machine()
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    saved = args.from_json or args.merge_json
    if saved:  # results measured earlier, one bench's JSON object per line
        source = Path(saved)
        measured = dt.datetime.fromtimestamp(source.stat().st_mtime, dt.timezone.utc).strftime(
            "%Y-%m-%d %H:%M UTC")  # when the run wrote it, unless the object says
        results = [{"measured": measured, **json.loads(line)}
                   for line in source.read_text().splitlines() if line.strip()]
    else:
        results = []
        for name in args.only:
            print(f"bench {name} ...", file=sys.stderr, flush=True)
            results.append({**run_bench(name, args.data), "measured": when})
            print(json.dumps(results[-1]), flush=True)
    page = Path(args.out)
    merged = results if args.from_json else merge(saved_results(page), results)
    plot = None
    site = next((r for r in merged if r["bench"] == "site-round" and "budgets" in r), None)
    if site:
        why = site_round_plot(site, page.parent / SITE_ROUND_PLOT)
        plot = SITE_ROUND_PLOT if why is None else None
        if why:
            print(f"site round plot not drawn: {why}", file=sys.stderr)
    page.write_text(render(merged, info, when, plot=plot) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
