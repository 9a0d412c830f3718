"""kubelora operator: turns LoRAFineTune resources into training pods."""
