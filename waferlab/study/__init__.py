"""Studies: an experiment matrix of ordinary training runs, resumable, and the report that compares them.

``spec`` (cells from a base config and axes), ``runner`` (``waferlab train``/``explain`` subprocesses),
``aggregate`` (per-run rows, per-group means), ``stats`` (intervals, paired tests), ``report``.
"""
