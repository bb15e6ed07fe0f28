"""Predicting on films: decoding uploads and indexed images, probabilities and the decision at
the stored operating point, uploads kept for review, saliency (tf-keras-vis, and ensembles' mean
maps) and its rendering, and the ``predict`` command.

May import :mod:`cxr_core.models`, :mod:`cxr_core.data` and everything below.
"""
