"""loralab's CPU speed path: pieces that keep PEFT's and transformers' results and run them faster on a CPU.

* catalogue: which pieces run for each CPU kind and precision (training) and for inference; no torch import;
* speed_path: switches the pieces on for a model, and off again, as one piece (training or inference);
* fused_lora: each LoRA linear's forward and backward as one autograd function;
* fused_norm: frozen RMSNorms with a closed-form backward;
* attention: causal attention per packed example as batched matmuls;
* head_loss: the frozen LM head's cross-entropy a chunk at a time (chosen per model by loralab.loss);
* onednn_weights: frozen linear weights kept in oneDNN's blocked layout (bf16 or fp32);
* allocator: glibc's malloc tuned for the row length.

Each has an equivalence test (tests/test_fused.py, tests/test_onednn_weights.py, tests/test_fp32_cpu.py). GPUs keep
PEFT's and transformers' own kernels, which is where those are fast and where these were not measured.
"""
