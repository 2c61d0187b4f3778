"""Errors a user can cause, one type per family.

Every message names the offending value. The command-line entry points print the message
without a traceback and exit with status 2 (see `mechreward.cli`).
"""


class MechrewardError(Exception):
    """Base class: an error the user can fix (bad path, bad value, bad data)."""


class ConfigError(MechrewardError):
    """A configuration value is invalid or inconsistent (k >= d_sae, unknown option, ...)."""


class ModelError(MechrewardError):
    """A model cannot be loaded or is not what is needed (unknown path, not a causal LM, ...)."""


class LayerError(ModelError):
    """A layer index is out of range, or the decoder layers of a model cannot be found."""


class DataError(MechrewardError):
    """Input data is unusable: empty corpus, no usable rows, NaN activations, one-class labels."""


class ShapeError(MechrewardError):
    """Tensors or checkpoints whose shapes do not fit (d_in != hidden size, wrong weight shape)."""


class SAEFormatError(MechrewardError):
    """An SAE checkpoint is unknown, unsafe, incomplete or inconsistent."""


class MismatchError(MechrewardError):
    """Artifacts that do not belong together: a pack for another SAE, a store for another layer."""
