"""Training: the CogVideoX objective, EMA, checkpoints with exact resume, logs, and fine-tuning.

The demo model is trained with `loop.py`. Fine-tuning (`cogvideox train`) reads a folder of captioned
videos (`data.py`), caches latents and T5 states (`cache.py`), trains a LoRA (`lora.py`) or every weight,
and is driven by `finetune.finetune(FinetuneConfig(...))` (`finetune.py`, `config.py`).
"""
