"""Training engine: Lightning module, runs, evaluation metrics and reports."""
