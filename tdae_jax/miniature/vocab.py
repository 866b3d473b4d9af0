"""Vocabulary of the miniature world: every word its captions, instructions and subject prompts can use.

The procedural world (``world.py``) draws all of its text from the constants and templates below, so
``words()`` is, by construction, the closed word list a small CLIP-style tokenizer needs.
Text is lower case, words are separated by single spaces, and there is no punctuation.
"""
from __future__ import annotations

COLOURS = ("red", "yellow", "green", "cyan", "blue", "purple")   # hues about 60 degrees apart
SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
SIZES = ("small", "large")
TEXTURES = ("plain", "striped", "dotted")          # "plain" is never written in object phrases
BACKGROUNDS = ("plain", "striped", "checkered", "gradient")
# 3x3 grid cells, row-major (cell = 3 * row + col).
POSITIONS = ("top left", "top center", "top right",
             "middle left", "center", "middle right",
             "bottom left", "bottom center", "bottom right")
# Rare identifier tokens for customization subjects (DreamBooth's "sks" and friends).
SUBJECT_TOKENS = ("sks", "zwx", "qvz", "jxk", "pfy", "bkz", "vmt", "kdr",
                  "xqj", "wzv", "fjq", "ykx", "hgz", "cvq", "tqx", "mzp")
SUBJECT_PATTERNS = ("split", "ring", "bands", "quarters")   # how a subject's two colours are laid out
SUBJECT_MARKINGS = ("dot", "eyes", "bar")                    # a small white/black mark on each subject

# Templates. Slots: {obj} object phrase, {ref} reference to an existing object, {colour}, {shape},
# {pos} a POSITIONS entry, {bg} a BACKGROUNDS entry, {token} a subject token, {cls} a shape noun.
CAPTION_JOIN = " and "
CAPTION = "{objects} on a {bg} background"
CAPTION_EMPTY = "an empty {bg} background"
CAPTION_POSITION = "{obj} in the {pos}"
RECOLOUR = ("make the {ref} {colour}", "turn the {ref} {colour}", "colour the {ref} {colour}",
            "change the colour of the {ref} to {colour}")
RESHAPE = ("turn the {ref} into a {shape}", "make the {ref} a {shape}", "change the {ref} into a {shape}")
REMOVE = ("remove the {ref}", "delete the {ref}", "erase the {ref}", "take away the {ref}")
ADD = ("add {obj} in the {pos}", "put {obj} in the {pos}", "draw {obj} in the {pos}")
MOVE = ("move the {ref} to the {pos}", "put the {ref} in the {pos}")
RESIZE = {"large": ("make the {ref} bigger", "enlarge the {ref}", "make the {ref} large"),
          "small": ("make the {ref} smaller", "shrink the {ref}", "make the {ref} small")}
SUBJECT_PROMPTS = ("a photo of {token} {cls}", "a dslr portrait of {token} {cls}",
                   "a photo of {token} {cls} on a {bg} background")
CLASS_PROMPT = "a photo of a {cls}"
EXTRA_WORDS = ("a", "an", "the", "of", "photo")


def _template_words(text: str) -> set[str]:
    out = set()
    for w in text.replace("{", " {").replace("}", "} ").split():
        if not w.startswith("{"):
            out.add(w)
    return out


def words() -> list[str]:
    """Sorted list of every word the world can write (captions, instructions, subject prompts)."""
    out = set(EXTRA_WORDS)
    for group in (COLOURS, SHAPES, SIZES, TEXTURES, BACKGROUNDS, SUBJECT_TOKENS):
        out.update(group)
    for pos in POSITIONS:
        out.update(pos.split())
    templates = [CAPTION_JOIN, CAPTION, CAPTION_EMPTY, CAPTION_POSITION, CLASS_PROMPT,
                 *RECOLOUR, *RESHAPE, *REMOVE, *ADD, *MOVE, *RESIZE["large"], *RESIZE["small"],
                 *SUBJECT_PROMPTS]
    for t in templates:
        out |= _template_words(t)
    return sorted(out)
