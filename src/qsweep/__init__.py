"""qsweep: hyperparameter sweeps for QLoRA fine-tuning."""

__version__ = "0.1.0"
