"""loralab: LoRA fine-tuning of small open LLMs on modest hardware."""

__version__ = "0.1.0"

IGNORE_INDEX = -100
"""Label value that excludes a position from the loss (transformers' and PyTorch's convention)."""

# loralab.cpu.head_loss.FrozenHeadCrossEntropy (shared with loralab.estimate, which must not import torch):
LOSS_CHUNK_ROWS = 128  # positions per logits chunk: 128 x 32,000 fp32 logits = 16 MB, reused from the heap
PLAIN_HEAD_MODELS = frozenset({"llama", "mistral", "qwen2", "qwen3"})  # logits = lm_head(final hidden), nothing after
# loralab.cpu.allocator.tune_allocator (shared with loralab.estimate): longer rows give freed memory back at once
LEAN_ALLOCATOR_ROW_TOKENS = 1024
