"""The SAE core: module (`model`), sparse kernels (`kernels`), trainer (`train`), checkpoint
formats (`formats`) and metrics (`evaluate`)."""

from .model import EncoderOutput, ForwardOutput, SAEConfig, SparseAutoencoder
from .train import SAETrainer, StepOutput, TrainerConfig

__all__ = ["SAEConfig", "SparseAutoencoder", "EncoderOutput", "ForwardOutput",
           "TrainerConfig", "SAETrainer", "StepOutput"]
