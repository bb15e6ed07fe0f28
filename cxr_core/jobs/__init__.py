"""Heavy work outside the Streamlit process: the queue (kinds, the action each needs, submit,
claim, progress), the launcher (start and reap worker processes) and the loop a worker runs.

The queue knows kind names, never the code that does a kind: the domains keep their handlers in
``<domain>/handlers.py`` and the composition root (:mod:`cxr_core.app`) hands them, with the
training run runner, to the loop. May import :mod:`cxr_core.auth`, :mod:`cxr_core.storage` and
:mod:`cxr_core.core`.
"""
