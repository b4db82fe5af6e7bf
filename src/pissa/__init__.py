"""pissa: PiSSA fine-tuning."""
__version__ = "0.1.0"
