"""dho: distil a CLIP teacher into a small dual-head student through a cached-logit pipeline."""

__version__ = "0.1.0"
