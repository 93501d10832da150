"""Stage two: heads trained on the cached features, evaluated and compared in seconds.

heads/     one module per head type and the ``HEADS`` registry; ``fitting`` (Adam, the batched grid trainer,
           thread control) and ``lbfgs`` (logistic regression where the features are)
train      ``train-head`` and ``compare``: sweeps, few-shot, reports on disk
evaluate   metrics (accuracy, per-class precision/recall/F1, confusion matrix) and the printed report
plots      the PNG figures
"""
