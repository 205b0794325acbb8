"""The appendix to the seven stage files: run directories and checkpoints (checkpoint.py,
hf_checkpoint.py), torch.distributed (dist.py), what sft.py and grpo.py share to train
(training.py), records, images, tokenizer and prompts (data.py), answer matching (answers.py),
flags from dataclasses (config.py), the OpenAI-compatible client (chat_client.py), benchmark files
(benchmarks.py), the per-GPU memory plan (memory.py) and training curves (curves.py)."""
