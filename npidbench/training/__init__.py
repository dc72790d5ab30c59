"""Supervised training shared by the linear probes and semi-supervised fine-tuning: augmentation,
batches sharded over torchrun's processes, and the resumable epoch loop."""
