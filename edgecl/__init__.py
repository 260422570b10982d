"""edgecl: on-device continual learning (CPS-Prompt with DPCT) over a frozen timm ViT."""

__version__ = "0.1.0"
