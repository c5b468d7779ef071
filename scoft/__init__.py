"""SCoFT: self-contrastive fine-tuning on CCUB. The library: plain Python, no orchestrator."""

__version__ = "0.1.0"
