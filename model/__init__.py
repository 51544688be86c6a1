"""The PyTorch side of cvae-search: config, data, the cVAE, losses, metrics and training.

Nothing here imports Optuna; ``search`` builds on this package, never the reverse.
"""

__version__ = "0.1.0"
