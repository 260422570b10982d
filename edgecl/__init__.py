"""edgecl: on-device continual learning (CPS-Prompt with DPCT) over a frozen timm ViT.

Layers, bottom up (``tests/test_imports.py`` enforces that no lower part imports a higher one):
``backbone``/``sampling``/``data``/``store``/``precision`` -> ``methods`` -> ``train`` -> ``telemetry``,
``export``, ``budget`` -> ``runner`` (the one run assembly: ``RunSpec`` -> ``Trainer``) -> ``serve``,
``bench``, ``fleet`` -> ``commands`` / ``cli``.
"""

__version__ = "0.1.0"
