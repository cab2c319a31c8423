"""Prompt templates for the zero-shot head: a registry of per-dataset lists ("{}" is the class name)."""

from __future__ import annotations

import string

from dho_pipeline.config import ConfigError

TEMPLATES: dict[str, list[str]] = {
    "generic": ["a photo of a {}."],
    "imagenet": [
        "itap of a {}.",
        "a bad photo of the {}.",
        "a origami {}.",
        "a photo of the large {}.",
        "a {} in a video game.",
        "art of the {}.",
        "a photo of the small {}.",
    ],
    "pets": ["a photo of a {}, a type of pet."],
    "flowers": ["a photo of a {}, a type of flower."],
    "aircraft": ["a photo of a {}, a type of aircraft."],
    "food": ["a photo of {}, a type of food."],
    "cars": ["a photo of a {}."],
    "dtd": ["{} texture."],
    "eurosat": ["a centered satellite photo of {}."],
    "ucf101": ["a photo of a person doing {}."],
    "sun397": ["a photo of a {}."],
    "caltech101": ["a photo of a {}."],
    "fashion-mnist": [
        "a photo of a {}.",
        "a black and white photo of a {}.",
        "a low resolution photo of a {}.",
        "a photo of the {}, a type of clothing.",
    ],
}


def resolve_templates(name: str | None, extra: list[str] | None = None) -> list[str]:
    """The templates of registry entry `name` (if any) followed by the user's own."""
    if name is not None and name not in TEMPLATES:
        known = ", ".join(sorted(TEMPLATES))
        raise ConfigError(f"teacher.templates: unknown template set {name!r} (known: {known})")
    templates = list(TEMPLATES.get(name, [])) + list(extra or [])
    for t in templates:
        try:  # as open_clip fills it: str.format with the class name
            fields = [field for _, field, _, _ in string.Formatter().parse(t) if field is not None]
        except ValueError as e:
            raise ConfigError(f"teacher.extra_templates: template {t!r} is no format string ({e}); write a literal "
                              "brace as '{{' or '}}'") from None
        if fields != [""]:
            raise ConfigError(f"teacher.extra_templates: template {t!r} must hold one '{{}}' for the class name (it "
                              f"has {len(fields)}{': ' + ', '.join(repr(f) for f in fields) if fields else ''})")
    if not templates:
        raise ConfigError("teacher.templates: no templates given")
    return templates
