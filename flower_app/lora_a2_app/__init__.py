"""Flower App entry points for lora-a2 (the code lives in the installed `lora_a2` package)."""
