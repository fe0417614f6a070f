"""vmwrap: run each batch job inside its own VM. The core never imports a scheduler."""

__version__ = "0.1.0"
