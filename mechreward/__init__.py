"""mechreward: SAE features of a model's residual stream as a validated, online RL reward."""

__version__ = "0.1.0"

__all__ = ["load_sae", "save_sae", "__version__"]


def __getattr__(name: str):
    # Lazy: `import mechreward` stays cheap (no torch) until an SAE function is used.
    if name in ("load_sae", "save_sae"):
        from .sae import formats

        return getattr(formats, name)
    raise AttributeError(f"module 'mechreward' has no attribute {name!r}")
