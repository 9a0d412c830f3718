"""kubelora trainer: standalone LoRA fine-tuning engine."""
