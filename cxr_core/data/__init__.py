"""Images and datasets: the one image loader (bounded decoding) and the child process that
decodes uploads under a memory limit (:mod:`.sandbox`), dataset discovery and indexing, metadata CSVs,
validation splits (patient, temporal, group) and the calibration slice, class balancing,
augmentation (its TF-free config and its Keras layers), augmentation presets, the pixel cache and
tf.data pipeline, label provenance and the Class balance report.

May import :mod:`cxr_core.stats`, :mod:`cxr_core.jobs`, :mod:`cxr_core.auth`,
:mod:`cxr_core.storage` and :mod:`cxr_core.core`.
"""
