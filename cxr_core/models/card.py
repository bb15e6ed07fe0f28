"""A model card: its file name, what its ``measured`` entries are called and which of them a
page may headline, and the card for people (``models/default/README.md``) rendered from the JSON.

Also holds :data:`DATA_LICENCE`, the training data's licence that every exported card carries
and the README repeats. Pure: the ``measured`` list itself is derived from stored evaluations by
:mod:`cxr_core.evaluation.card_measured`.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from cxr_core.stats.reports import class_report

DATA_LICENCE = {
    "dataset": "Chest X-Ray Images (Pneumonia), Guangzhou Women and Children's Medical Center",
    "citation": "Kermany DS, Goldbaum M, Cai W, et al. Identifying Medical Diagnoses and "
                "Treatable Diseases by Image-Based Deep Learning. Cell 172(5):1122-1131, 2018. "
                "doi:10.1016/j.cell.2018.02.010",
    "source": "Mendeley Data, doi:10.17632/rscbjbr9sj.2",
    "licence": "CC BY 4.0",
}
# The one-line attribution a run's model_card.json carries.
DATA_ATTRIBUTION = f"Kermany et al., Cell 2018, {DATA_LICENCE['licence']}"
SPLIT_WORDS = {"patient": "random patient", "temporal": "temporal (earliest patients held out)",
               "group": "held-out folder"}


def card_markdown(card: dict) -> str:
    """A short human-readable model card (``models/default/README.md``)."""
    val = card.get("val_metrics") or {}
    op = card.get("operating_point") or {}
    lic = card.get("data_licence") or DATA_LICENCE
    cfg = card.get("training_config") or {}
    exp = card.get("exported_from") or {}
    counts = (card.get("dataset") or {}).get("counts") or {}
    minutes = f"{exp['training_wall_s'] / 60:.1f} min" if exp.get("training_wall_s") else "?"
    positive = (card.get("labels") or ["", "PNEUMONIA"])[-1]
    split = cfg.get("split", "patient")
    lines = [
        "# Demo model card (`models/default`)", "",
        "A small pneumonia classifier shipped so Predict works on a fresh clone. **Not a medical "
        "device**: a demo model trained from scratch on one public pediatric dataset.", "",
        "| | |", "|---|---|",
        f"| Labels | {', '.join(card.get('labels', []))} ({card.get('label_scheme', '?')}) |",
        f"| Architecture | `{card.get('model', '?')}` from the registry, {card.get('image_size')} "
        f"px, {card.get('channels')} channel(s), random init (no ImageNet weights) |",
        f"| Training | recipe `{cfg.get('recipe', '?')}` overridden by `train_config.json`: "
        f"{cfg.get('epochs', '?')} epochs max (best epoch {card.get('best_epoch', '?')}), "
        f"augment `{cfg.get('augment', '?')}`, balancing `{cfg.get('balancing', '?')}`, "
        + (f"intensity `{cfg['intensity']}` (per image, inside the model), "
           if cfg.get("intensity", "none") != "none" else "")
        + (f"label smoothing {cfg['label_smoothing']}, " if cfg.get("label_smoothing") else "")
        + f"monitor `{cfg.get('monitor', '?')}`; {minutes} wall on 2 shared CPU cores |",
        f"| Data | `{cfg.get('dataset', '?')}`: train {_counts(counts.get('train'))}, "
        f"validation {_counts(counts.get('val'))} ({SPLIT_WORDS.get(split, split)}, grouped "
        f"by patient{', seed ' + str(cfg.get('split_seed', '?')) if split == 'patient' else ''})"
        " |",
        f"| Operating point | {positive} iff P({positive}) >= {_fmt(op.get('threshold'))} "
        f"(chosen on {_chosen_on_text(op)} for sensitivity >= {_fmt(op.get('target'))}) |",
        f"| Saliency layer | `{card.get('saliency_layer')}` |",
        f"| Parameters | {parameters_text(card.get('parameters'))} |",
        f"| File | `model.keras`, {exp.get('file_mb', '?')} MB (exported from run "
        f"{exp.get('run_id', '?')}) |", "",
        *_measured_lines(card.get("measured") or [], card.get("recipe_selected_on") or ()),
        *[f"{note}\n" for note in card.get("notes") or ()],
        *stress_lines(card.get("stress")),
        "## Validation metrics", "",
        "| AUC | sensitivity | specificity | accuracy | average precision | n |",
        "|---|---|---|---|---|---|",
        f"| {_fmt(val.get('auc'))} | {_fmt(val.get('sensitivity'))} | "
        f"{_fmt(val.get('specificity'))} | {_fmt(val.get('accuracy'))} | "
        f"{_fmt(val.get('average_precision'))} | {val.get('n', '?')} |", "",
        ("Sensitivity and specificity are at the threshold chosen on the calibration slice "
         f"({_fmt(val.get('threshold'))}), not at a site threshold, on the "
         if op.get("chosen_on") == "site" else
         "Sensitivity and specificity are at the operating point above, on the ") +
        f"{SPLIT_WORDS.get(split, split)} validation split carved from the official train "
        "folder; " + ("the operating point was chosen on these same images, so they flatter it"
                      if op.get("chosen_on", "val") == "val" else
                      "that threshold was chosen on the calibration slice, apart from these "
                      "images; early stopping and the best epoch were chosen on them"
                      if op.get("chosen_on") == "site" else
                      "the operating point was chosen on the calibration slice, apart from "
                      "these images; early stopping and the best epoch were chosen on them")
        + (" (in-distribution: a random patient split of one acquisition period)"
           if split == "patient" else "") + ". For reference, Kermany et al. "
        "report AUC 0.968, sensitivity 0.932 and specificity 0.901 on their held-out test set "
        "(ImageNet-pretrained Inception V3). Validation images come from the same distribution "
        "as the training images while the official test set does not, so expect lower numbers "
        "there (`python -m cxr_core evaluate --model default --data PATH --split test`).", "",
        *_per_class_lines(card),
        "## Data licence", "",
        f"{lic['dataset']}. {lic['citation']}. {lic['source']}. Licence: {lic['licence']} "
        "(attribution required wherever the model or its outputs are shown or shipped).", "",
        "## Reproduce", "",
        "From the repository root (state goes to `CXR_HOME`, default `~/.cxr`):",
        "", "```bash",
        "python -m cxr_core train --config models/default/train_config.json --json",
        "# prints {\"run_id\": ID, \"status\": \"finished\", ...}",
        "python -m cxr_core.training.export export-default ID   # writes model.keras, "
        "model_card.json, README.md here", "```", "",
    ]
    return "\n".join(lines)


def parameters_text(params: Mapping[str, Any] | None) -> str:
    """``1,234,567 (1,230,000 trainable)``, or "?" for a card without them."""
    if not params:
        return "?"
    return f"{params['total']:,} ({params['trainable']:,} trainable)"


def card_per_class(card: Mapping[str, Any]) -> dict | None:
    """The card's per-class report at its operating point on validation: precision, recall,
    F1 and support of each class plus the macro and weighted averages.

    A card written since issue 27 stores it (``per_class``); an older binary card's is derived
    exactly from its validation class counts and its sensitivity and specificity there (the
    2x2 confusion matrix they determine). None when neither is known.
    """
    if card.get("per_class"):
        return dict(card["per_class"])
    labels = list(card.get("labels") or [])
    val = card.get("val_metrics") or {}
    counts = ((card.get("dataset") or {}).get("counts") or {}).get("val") or {}
    if len(labels) != 2 or val.get("sensitivity") is None or val.get("specificity") is None \
            or not all(counts.get(c) for c in labels):
        return None
    neg, pos = (int(counts[c]) for c in labels)
    tp = round(val["sensitivity"] * pos)
    tn = round(val["specificity"] * neg)
    fn, fp = pos - tp, neg - tn

    def row(label: str, hit: int, miss: int, false: int, support: int) -> dict:
        precision = hit / (hit + false) if hit + false else 0.0
        recall = hit / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return {"label": label, "precision": precision, "recall": recall, "f1": f1,
                "support": support}
    rows = class_report([row(labels[0], tn, fp, fn, neg), row(labels[1], tp, fn, fp, pos)])
    return {"split": "val", "threshold": val.get("threshold"), "n": neg + pos, "rows": rows,
            "derived": "from the card's validation counts, sensitivity and specificity"}


def _per_class_lines(card: Mapping[str, Any]) -> list[str]:
    rep = card_per_class(card)
    if not rep:
        return []
    t = rep.get("threshold")
    lines = ["## Per class at the operating point", "",
             f"Validation ({rep.get('n')} images), "
             + ("argmax" if t is None else f"threshold {_fmt(t)}")
             + ("; derived " + rep["derived"] if rep.get("derived") else "") + ".", "",
             "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    lines += [f"| {r['class']} | {_fmt(r['precision'])} | {_fmt(r['recall'])} | "
              f"{_fmt(r['f1'])} | {r['support']} |" for r in rep["rows"]]
    return [*lines, ""]


def _chosen_on_text(op: dict) -> str:
    if op.get("chosen_on") == "site":
        return (f"the whole labelled sample of the site `{op.get('dataset', '?')}` "
                f"({op.get('sample_n', '?')} films; a site threshold, so its figures there "
                "are cross-fitted)")
    if op.get("chosen_on") == "calibration":
        n = op.get("calibration_n")
        return ("the calibration slice" + (f" ({n} validation images set apart from model "
                                           "selection)" if n else ""))
    return "validation"


def _measured_lines(measured: list[dict], selected_on: Iterable[str] = ()) -> list[str]:
    """The card's ``measured`` list: headline figures first (external validation, temporal
    validation, then independent evaluations, then in-distribution), every split below with
    its intervals."""
    if not measured:
        return []
    lines = ["## Headline", "",
             "At the locked operating point, never on the images it was chosen on; 95% "
             "bootstrap intervals over patients.", ""]
    for e in headline(measured) or []:
        if e.get("role") == "external":
            lines.append(f"- **{entry_title(e)}**: {external_text(e, selected_on)}")
            continue
        lines.append(f"- **{entry_title(e)}**: AUC {fmt_ci(e.get('auc'), e.get('auc_ci'))}, "
                     f"sensitivity {fmt_ci(e.get('sensitivity'), e.get('sensitivity_ci'))}, "
                     f"specificity {fmt_ci(e.get('specificity'), e.get('specificity_ci'))}")
    if not headline(measured):
        lines.append("- none yet: every figure was scored on the images its threshold was "
                     "chosen on, or on data the model has seen")
    lines += ["", "## Measured on every split", "",
              "| split | n (patients) | AUC | sensitivity | specificity | threshold | "
              "chosen on | labels |", "|---|---|---|---|---|---|---|---|"]
    for e in measured:
        mark = " (threshold chosen here)" if e.get("threshold_chosen_here") or e.get(
            "stored_threshold_chosen_here") else ""
        site = e.get("site_threshold") or {}
        if e.get("role") == "external" and e.get("sensitivity") is None and site \
                and not site.get("refused"):  # only the cross-fitted figures hold here
            lines.append(
                f"| {entry_title(e)}{mark} | {e.get('n')} ({e.get('n_patients') or '?'}) | "
                f"{fmt_ci(e.get('auc'), e.get('auc_ci'))} | "
                f"{fmt_ci(site.get('sensitivity'), site.get('sensitivity_ci'))} (cross-fitted) | "
                f"{fmt_ci(site.get('specificity'), site.get('specificity_ci'))} (cross-fitted) | "
                f"site threshold per fold | other folds of this site | "
                f"{e.get('label_source') or '?'} |")
            continue
        lines.append(
            f"| {entry_title(e)}{mark} | {e.get('n')} ({e.get('n_patients') or '?'}) | "
            f"{fmt_ci(e.get('auc'), e.get('auc_ci'))} | "
            f"{fmt_ci(e.get('sensitivity'), e.get('sensitivity_ci'))} | "
            f"{fmt_ci(e.get('specificity'), e.get('specificity_ci'))} | "
            f"{_fmt(e.get('threshold'))} | {e.get('chosen_on') or '?'} | "
            f"{e.get('label_source') or '?'} |")
    return [*lines, ""]


def stress_summary(stress: dict | None) -> str:
    """One sentence on the card's shift stress test ("" when there is none)."""
    if not stress or not stress.get("rows"):
        return ""
    worst, clean = stress.get("worst_specificity") or {}, stress["rows"][0]
    return (f"Under synthetic acquisition shift of the same {stress.get('n')} "
            f"{stress.get('split') or ''} images at the same threshold "
            f"{_fmt(stress.get('threshold'))}, specificity falls from "
            f"{_fmt(clean.get('specificity'))} to {_fmt(worst.get('specificity'))} "
            f"({worst.get('perturbation', '?')}) while AUC stays at least "
            f"{_fmt(stress.get('min_auc'))}: the threshold, not the ranking, is what breaks "
            "first on another site's films. A stress test, not a deployment figure.")


def stress_lines(stress: dict | None) -> list[str]:
    """The card's ``stress`` entry as a section (none when the card has none)."""
    if not stress or not stress.get("rows"):
        return []
    lines = ["## Under synthetic shift (stress test)", "", stress_summary(stress), "",
             "| change | AUC | sensitivity | specificity |", "|---|---|---|---|"]
    for r in stress["rows"]:
        lines.append(f"| {r.get('what', r.get('perturbation'))} | {_fmt(r.get('auc'))} | "
                     f"{_fmt(r.get('sensitivity'))} | {_fmt(r.get('specificity'))} |")
    return [*lines, "", "`python -m cxr_core stress` reproduces it on any run "
            "(docs/experiments.md).", ""]


def _counts(counts: dict | None) -> str:
    if not counts:
        return "?"
    return " + ".join(f"{v:,} {k}" for k, v in counts.items())


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else "?"


CARD_NAME = "model_card.json"  # beside every model file
VALIDATION_TEXT = {"temporal": "temporal validation", "patient": "in-distribution validation "
                   "(random patient split)", "group": "held-out group validation"}
ROLE_TEXT = {"selection": "validation (model selection)", "calibration": "calibration slice",
             "seen": "evaluation on data it has seen", "independent": "evaluation"}


def headline(measured: Iterable[Mapping[str, Any]]) -> list[dict]:
    """The entries a page may headline, best evidence first: external validation (another site
    or period), then temporal validation, then independent evaluations, then held-out-group
    and in-distribution validation. Entries scored on the images their threshold was chosen
    on, or on data the model has seen, are left out."""
    order = {"temporal": 1, None: 2, "group": 3, "patient": 4}

    def rank(e: Mapping[str, Any]) -> int:
        return 0 if e.get("role") == "external" else order.get(e.get("validation"), 2)
    keep = [dict(e) for e in measured if not e.get("threshold_chosen_here")
            and e.get("role") in ("external", "selection", "independent")
            and (e.get("role") != "external" or e.get("auc") is not None)]
    return sorted(keep, key=rank)


def external_text(entry: Mapping[str, Any], selected_on: Iterable[str] = ()) -> str:
    """One sentence of an external entry: AUC, the stored threshold's figures (unless chosen
    on this sample) and the cross-fitted site threshold's, each with its interval."""
    parts = [f"AUC {fmt_ci(entry.get('auc'), entry.get('auc_ci'))}"]
    if entry.get("stored_threshold_chosen_here"):
        parts.append("its stored threshold was chosen on this sample, so only cross-fitted "
                     "figures are reported")
    elif entry.get("sensitivity") is not None:
        parts.append(f"at its stored threshold {_fmt(entry.get('threshold'))}: sensitivity "
                     f"{fmt_ci(entry.get('sensitivity'), entry.get('sensitivity_ci'))}, "
                     f"specificity {fmt_ci(entry.get('specificity'), entry.get('specificity_ci'))}")
    site = entry.get("site_threshold") or {}
    if site.get("refused"):
        parts.append(f"no site threshold ({site['refused']})")
    elif site:
        parts.append(f"at a site threshold chosen on the site's own films for sensitivity >= "
                     f"{site.get('target_sensitivity', 0.95):.2f} (cross-fitted, "
                     f"{site.get('folds')} folds x {site.get('repeats')}): sensitivity "
                     f"{fmt_ci(site.get('sensitivity'), site.get('sensitivity_ci'))}, "
                     f"specificity {fmt_ci(site.get('specificity'), site.get('specificity_ci'))}")
    text = "; ".join(parts)
    if entry.get("excluded_seen"):
        text += (f" ({entry['excluded_seen']} image(s) the model trained, selected or was "
                 "calibrated on left out)")
    if entry.get("dataset") in set(selected_on):
        text += ("; note: the recipe was chosen on this sample, so it is no longer a fully "
                 "independent test of the recipe")
    return text


def entry_title(entry: Mapping[str, Any]) -> str:
    """e.g. ``temporal validation (val, 540 images)`` or ``evaluation on kermany [test]``."""
    if entry.get("role") == "external":
        return (f"at a new site: {entry.get('dataset') or '?'} [{entry.get('split')}], "
                f"{entry.get('n')} images, {entry.get('n_patients') or '?'} patients")
    kind = VALIDATION_TEXT.get(entry.get("validation")) or ROLE_TEXT.get(entry.get("role"), "")
    if entry.get("role") == "calibration":
        kind = "calibration slice" + (f" ({VALIDATION_TEXT[entry['validation']]})"
                                      if entry.get("validation") in VALIDATION_TEXT else "")
    where = f"{entry.get('dataset') or '?'} [{entry.get('split')}]"
    return f"{kind}: {where}, {entry.get('n')} images"


def fmt_ci(value: Any, ci: Any) -> str:
    """``0.951 [0.91, 0.98]`` (or ``?``)."""
    if not isinstance(value, (int, float)):
        return "?"
    if not ci or any(not isinstance(v, (int, float)) for v in ci):
        return f"{value:.3f}"
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def three_class_markdown(card: Mapping[str, Any], loaded: Any) -> str:
    """``models/three_class/README.md``: the two-step model, its decision rule, priors and its
    figures on the external sample (cross-fitted)."""
    pneu, sub = loaded.members
    priors = sub.card.get("priors") or {}
    lic = card.get("data_licence") or DATA_LICENCE

    def prior_text(values: Any) -> str:
        return " : ".join(f"{c.lower()} {float(v):.2f}" for c, v in zip(sub.labels, values or ()))

    lines = [
        "# Three-class demo model card (`models/three_class`)", "",
        "Normal / bacterial / viral pneumonia, read in **two steps** as clinicians do. **Not a "
        "medical device**: demo models trained from scratch on one public pediatric dataset.", "",
        "| | |", "|---|---|",
        f"| Step 1: pneumonia | `pneumonia/model.keras` ({pneu.card.get('model', '?')}, "
        f"{pneu.image_size} px): PNEUMONIA iff P(PNEUMONIA) >= {_fmt(pneu.threshold)} "
        f"({pneu.threshold_source}) |",
        f"| Step 2: subtype | `subtype/model.keras` ({sub.card.get('model', '?')}, "
        f"{sub.image_size} px, trained on pneumonia films only): the more probable of "
        "BACTERIA / VIRUS |",
        f"| Priors | trained at {prior_text(priors.get('train'))} (balancing "
        f"`{priors.get('balancing', '?')}`); decides at {prior_text(priors.get('target'))} "
        f"({priors.get('target_source', '?')}) |",
        f"| Use | `--model three_class` (CLI), or pick it on Predict and Compare |", "",
        f"Decision: {card.get('decision', '')}.", "",
    ]
    for m in card.get("measured") or []:
        fit, flat = m.get("hierarchical_crossfit") or {}, m.get("argmax_at_training_priors") or {}
        lines += [f"## At a new site: `{m['dataset']}` ({m.get('n')} films, "
                  f"{m.get('patients')} patients)", "",
                  "| rule | accuracy | macro-F1 | recall normal | recall bacterial | "
                  "recall viral |", "|---|---|---|---|---|---|"]
        for name, r in (("two steps, cross-fitted (" + (fit.get("chosen") or "nothing")
                         + " chosen on other patients' films)", fit),
                        ("flat argmax of the same probabilities (nothing chosen there)", flat)):
            if r:
                rec = r.get("recall") or {}
                lines.append(f"| {name} | {fmt_ci(r.get('accuracy'), r.get('accuracy_ci'))} | "
                             f"{fmt_ci(r.get('macro_f1'), r.get('macro_f1_ci'))} | "
                             f"{_fmt(rec.get('NORMAL'))} | {_fmt(rec.get('BACTERIA'))} | "
                             f"{_fmt(rec.get('VIRUS'))} |")
        if fit.get("confusion"):
            lines += ["", "Confusion (two steps, one cross-fitted repeat; rows true, columns "
                      "decided: normal, bacterial, viral): "
                      + "; ".join(" ".join(str(v) for v in row) for row in fit["confusion"]),
                      ""]
        lines += ["Intervals are 95% percentile intervals from resampling whole patients. "
                  "The shipped pneumonia threshold (and the subtype prior, where the site's) "
                  "were chosen on this sample, so figures at the shipped rule there are not "
                  "results; the cross-fitted ones are.", ""]
    lines += [*[f"{note}\n" for note in card.get("notes") or ()],
              "## Data licence", "",
              f"{lic['dataset']}. {lic['citation']}. {lic['source']}. Licence: "
              f"{lic['licence']} (attribution required wherever the model or its outputs are "
              "shown or shipped).", ""]
    return "\n".join(lines)
