"""Stage two: heads trained on the cached features, evaluated and compared in seconds.

heads/      the ``HEADS`` registry (torch-free: names, descriptions, knobs), ``HeadConfig`` and one module per head
            type; ``fitting`` (Adam, the batched grid trainer, thread control) and ``lbfgs`` (logistic regression)
tasks       what differs between classification and regression: one ``Task`` each
protocol    held-out parts of train, ``--sweep``, ``--positive`` thresholds, ``--shots``, the one fit
training    ``train-head``: fit + evaluate + write one head's folder
comparing   ``compare`` (and ``--layers``, ``--shots``) and their tables
runs        run folders: default roots, recorded settings, the check before replacing, the folder lock
train       the public names of the modules above, in one import
evaluate    metrics records (accuracy, per-class P/R/F1, confusion; R^2, RMSE, MAE) and the printed report
plots       the PNG figures
report      report.html of a compare folder and of a leaderboard (the page blocks: ``pipeline.html``)
"""
