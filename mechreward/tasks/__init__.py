"""Tasks: prompts + reference answers + a verifier (arithmetic organism, GSM8K-style math, MCQ)."""

from .base import Question, Task
from .loading import TaskConfig, load_task
from .math import MathTask
from .mcq import MCQTask

__all__ = ["Question", "Task", "TaskConfig", "load_task", "MathTask", "MCQTask"]
