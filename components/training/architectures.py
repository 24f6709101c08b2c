"""The architectures `train` can build, as plain names: torch-free, so the CLI can offer them as
choices without importing torch (models.py builds them)."""

RESNET_DEPTHS = (18, 34, 50, 101, 152)
EFFICIENTNET_LITES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
ARCHITECTURES = tuple(f"resnet{d}" for d in RESNET_DEPTHS) + EFFICIENTNET_LITES
