"""Statistics, pure numpy/scikit-learn: binary and multi-class metrics, ROC/PR and reliability
curves, patient-clustered bootstrap intervals, operating points (thresholds), paired tests
(McNemar), evaluation reports and their long-form tables.

No database, no TensorFlow, no files. May import :mod:`cxr_core.core` only.
"""
