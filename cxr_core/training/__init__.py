"""Training: :class:`~.config.TrainConfig` and the recipes (TF-free), a run's inputs from the
index (labels, split, calibration slice), the fit (stages, callbacks, sinks), checkpoints, a run's
lifecycle in the worker (:mod:`.runner`), what a finished run records (:mod:`.outputs`), the
service the pages call (queue, cancel, resume, list runs, live curves), the checked actions and
the shipped model's export, and label audits (:mod:`.label_audit`: K fold runs, out-of-fold
probabilities, confident learning).

Above evaluation (a finished run is evaluated): may import :mod:`cxr_core.evaluation`,
:mod:`cxr_core.predict`, :mod:`cxr_core.models`, :mod:`cxr_core.data` and everything below.
"""
