"""The one prompt builder: how a span's text becomes the prompt that is generated, retrieved and cached.

Generation (``audio_gen.build_cache``), retrieval (``audio_gen.generators.retrieval``) and the trainer's cache
look-ups all call `build_prompt`, so one span always gets one cache key.  Whitespace is normalised first:
manifests keep the sentence's own spacing, and "a  dog" and "a dog" are the same sound to imagine.
"""

from __future__ import annotations

from ith_common.errors import UserError

# ITH's prompt (the paper's Stable Audio prompt is the span followed by "sound").
DEFAULT_PROMPT_TEMPLATE = "{span} sound"


def check_template(template: object, *, key: str = "prompt_template") -> str:
    if not isinstance(template, str) or template.count("{span}") != 1:
        raise UserError(f"config key '{key}': expected text with exactly one {{span}}, got {template!r}")
    return template


def normalise_span_text(text: str) -> str:
    return " ".join(text.split())


def build_prompt(span_text: str, template: str = DEFAULT_PROMPT_TEMPLATE) -> str:
    """``'{span} sound'`` filled with the whitespace-normalised span text."""
    return check_template(template).replace("{span}", normalise_span_text(span_text))
