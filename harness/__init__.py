"""mdh: benchmark and ablation harness for multi-task robot diffusion policies."""

__version__ = "0.1.0"
