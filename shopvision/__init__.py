"""shopvision: classify marketplace product photos into catalogue categories."""

__version__ = "0.1.0"
