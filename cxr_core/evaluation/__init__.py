"""Measuring models: evaluate a model on a dataset and store its per-image outputs, operating
points (per run, and site thresholds per model and dataset), Compare (one label version for every
run, matched thresholds, intervals, seen-data warnings), subgroups, the synthetic shift stress test
and the cards' ``measured`` lists.

May import :mod:`cxr_core.predict`, :mod:`cxr_core.models`, :mod:`cxr_core.data` and everything
below; never :mod:`cxr_core.review` (review reads what evaluation stores through storage).
"""
