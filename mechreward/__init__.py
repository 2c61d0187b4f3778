"""mechreward: SAE features of a model's residual stream as a validated, online RL reward."""

__version__ = "0.1.0"
