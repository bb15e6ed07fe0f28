"""Hyperparameter studies (Optuna): each trial an ordinary queued run.

- :mod:`cxr_core.search.config`: :class:`StudyConfig` (name, base run config, search space,
  objective, sampler, pruner, number of trials and how many at once) and the space's
  validation (an unknown field, low > high or an empty choice is refused, naming the field).
- :mod:`cxr_core.search.study`: create a study, advance it (tell Optuna how ended trials went,
  ask for and queue the next ones, in one transaction of the app database under the study's
  lock), read its trials, its best trial and its plots, promote the best trial.
- :mod:`cxr_core.search.trials`: what a worker does with a run that is a trial (the pruning
  reports go through the runner's per-epoch hook, so training never imports Optuna), and the
  worker loop's tick that advances studies whose trials ended elsewhere (a reaped worker).
- :mod:`cxr_core.search.actions`: the checked actions (role, quota, audit).

Above training in the layers: may import training and everything below it. The Optuna study
lives in its own store (:mod:`cxr_core.storage.optuna_store`), never the app's database.
"""
