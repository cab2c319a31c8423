"""The teacher: an open_clip model with its zero-shot head, prompt templates, Tip-Adapter, and the demo's tiny CLIP."""
