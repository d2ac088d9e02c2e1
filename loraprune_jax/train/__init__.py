"""Training: the compiled LLM step (LoRA gradients, clipping, AdamW, the criterion's scores and
their moving average) and the update it shares with the vision step, the training loop with mask
updates between compiled phases, orbax checkpoints, the classifier families and their step,
``training.png``, and the malloc setting that keeps XLA's freed CPU buffers."""
