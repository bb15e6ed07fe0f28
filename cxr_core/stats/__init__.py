"""Statistics, pure numpy/scikit-learn: binary and multi-class metrics, ROC/PR and reliability
curves, patient-clustered bootstrap intervals, operating points (thresholds), paired tests
(McNemar), evaluation reports and their long-form tables, confident learning (which given
labels are likely wrong, from out-of-sample probabilities) and Fleiss' kappa.

No database, no TensorFlow, no files. May import :mod:`cxr_core.core` only.
"""
