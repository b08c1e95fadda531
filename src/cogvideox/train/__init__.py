"""Training: the CogVideoX objective, EMA, checkpoints with exact resume, logs.

The demo model is trained with this code; the fine-tuning trainer builds on it.
"""
