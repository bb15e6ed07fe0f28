"""Clinician review: the queues, relabels (append-only, with undo), what an entry shows,
blind and double reading with adjudication (:mod:`.reading`), agreement between readers, relabel
export and import, retention of uploads and exports (:mod:`.retention`), and the checked review
actions.

May import :mod:`cxr_core.predict` (uploads, saliency rendering), :mod:`cxr_core.models`,
:mod:`cxr_core.data` and everything below; never :mod:`cxr_core.evaluation`.
"""
