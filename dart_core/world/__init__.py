"""The embedded default world: a procedural image generator with boxes and captions, the
localization metric, and a small CLIP pretrained on the world's captions (vlp.py)."""
