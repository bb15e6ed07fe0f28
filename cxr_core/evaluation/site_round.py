"""The site round as measured for a shipped model: what confirming a new site's films buys.

``python -m cxr_core bench site-round`` (``bench/site_round.py``) writes its JSON object beside
the model it started from (``models/default/site_round.json``). This module reads it back as
long-form rows, so a page draws specificity at the target sensitivity against the number of
films reviewed, one line per decision rule, with the patient-clustered intervals.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxr_core.core.errors import ConfigError
from cxr_core.models.store import DEFAULT_MODELS_DIR

SITE_ROUND_FILE = "site_round.json"

# The bench's decision rules, in the order a reader compares them (key -> legend).
SERIES: dict[str, str] = {
    "base_stored": "base model, its stored threshold",
    "base_site": "base model, threshold chosen on the confirmed films",
    "base_crossfit": "base model, site threshold (cross-fitted)",
    "next_crossfit": "next round, site threshold (cross-fitted)",
}


@dataclass(frozen=True)
class SiteRound:
    """One measured site round: the bench's settings and its rows.

    Attributes:
        site: the new site's folder as the bench saw it.
        base: the model the round started from ("default" or "run:ID").
        folds: patient-grouped folds over the site's films.
        wall_s: the whole bench's wall time in seconds.
        rows: long-form rows, one per (budget, series): ``budget``, ``series`` (legend),
            ``key``, ``sensitivity``, ``specificity``, ``low``, ``high`` (the specificity's 95%
            interval), ``auc`` (None where the rule has no single score), ``n``, ``refused``
            (why a site threshold could not be chosen on that many films, else None).
        raw: the bench's JSON object.
    """

    site: str
    base: str
    folds: int
    wall_s: float
    rows: list[dict]
    raw: dict

    @property
    def budgets(self) -> list[int]:
        return sorted({r["budget"] for r in self.rows})


BEFORE_THE_SITE = "base model, its threshold before the site"


def series(data: Mapping[str, Any]) -> dict[str, str]:
    """The decision rules' legends for one bench result: the base's row says "before the site"
    when the bench stood it at another threshold than its stored one (``base_threshold``: the
    stored one was chosen on this site's films)."""
    moved = data.get("base_threshold") or {}
    if moved.get("value") is not None and moved.get("value") != moved.get("stored"):
        return {**SERIES, "base_stored": BEFORE_THE_SITE}
    return dict(SERIES)


def _rows(budgets: list[dict], legends: Mapping[str, str]) -> list[dict]:
    rows = []
    for entry in budgets:
        for key, legend in legends.items():
            got = entry.get(key)
            if not isinstance(got, dict):
                continue
            refused = got.get("refused")
            ci = got.get("specificity_ci") or [None, None]
            rows.append({"budget": int(entry["budget"]), "series": legend, "key": key,
                         "sensitivity": None if refused else got.get("sensitivity"),
                         "specificity": None if refused else got.get("specificity"),
                         "low": None if refused else ci[0], "high": None if refused else ci[1],
                         "auc": got.get("auc"), "n": got.get("n", entry.get("n_scored")),
                         "refused": refused})
    return rows


def figure(got: SiteRound) -> Any:
    """Specificity (aiming at sensitivity 0.95) against the films confirmed, one line per
    decision rule with its 95% interval: the picture Compare draws and docs/benchmarks.md keeps
    (a Plotly figure)."""
    import plotly.express as px

    rows = [r for r in got.rows if r["specificity"] is not None]
    return px.line(rows, x="budget", y="specificity", color="series", markers=True,
                   error_y=[r["high"] - r["specificity"] for r in rows],
                   error_y_minus=[r["specificity"] - r["low"] for r in rows],
                   labels={"budget": "films confirmed on Review", "series": "decision",
                           "specificity": "specificity (aiming at sensitivity 0.95)"})


def parse(data: Any) -> SiteRound:
    """A bench site-round JSON object as a :class:`SiteRound`.

    Raises:
        ConfigError: the object is not a site-round result.
    """
    if not isinstance(data, dict) or data.get("bench") != "site-round" or not isinstance(
            data.get("budgets"), list) or not data["budgets"]:
        raise ConfigError("not a site-round benchmark result (expected the JSON object of "
                          "python -m cxr_core bench site-round). Received keys: "
                          f"{sorted(data) if isinstance(data, dict) else type(data).__name__}")
    return SiteRound(site=str(data.get("site", "")), base=str(data.get("base", "")),
                     folds=int(data.get("folds", 0)), wall_s=float(data.get("wall_s", 0.0)),
                     rows=_rows(data["budgets"], series(data)), raw=data)


def measured(model_dir: Path | str = DEFAULT_MODELS_DIR) -> SiteRound | None:
    """The site round measured for the model in ``model_dir``, or None if none was recorded.

    Raises:
        ConfigError: the file is there but unreadable or not a site-round result.
    """
    path = Path(model_dir) / SITE_ROUND_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} is not readable JSON: {exc}") from exc
    return parse(data)
