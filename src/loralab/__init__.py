"""loralab: LoRA fine-tuning of small open LLMs on modest hardware."""

__version__ = "0.1.0"

IGNORE_INDEX = -100
"""Label value that excludes a position from the loss (transformers' and PyTorch's convention)."""
