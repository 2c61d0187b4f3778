"""The built-in model organism: a tiny Qwen3 trained on multi-step arithmetic."""

from pathlib import Path

ORGANISM_DIR = Path(__file__).resolve().parent / "weights"
