"""trb: on-policy distillation of language models with Trust-Region behavior Blending."""

__version__ = "0.1.0"
