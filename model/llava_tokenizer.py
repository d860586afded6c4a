"""The tiny LLaVA-OneVision tokenizer, built locally (no download) for the LLaVA tiny presets.

It is the project's tiny vocabulary (`model.tokenizer`: the same byte-level BPE and the
same special-token slots) with the two placeholder slots named as LLaVA names them:
`<image>` at the image-placeholder slot (`BASE_VOCAB + 12`, Qwen's `<|image_pad|>`) and
`<video>` at the video-placeholder slot (`BASE_VOCAB + 13`). So every preset, Qwen or
LLaVA, shares one set of special-token ids (`model.presets`' rule), and the LLaVA
config's `image_token_index` / `video_token_index` point at `<image>` / `<video>`.
`<|endoftext|>` (pad), `<|im_start|>` and `<|im_end|>` (eos) keep their slots, as in the
real LLaVA-OneVision tokenizer, which is Qwen2's with `<image>` and `<video>` added.

The chat template renders a turn as LLaVA-OneVision's Hugging Face checkpoints do: the
role line, every image as `<image>\\n` first, then the text, then `<|im_end|>\\n`; no
default system turn.
"""
from __future__ import annotations

import json

from model import tokenizer as base

IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"
RENAMED = {"<|image_pad|>": IMAGE_TOKEN, "<|video_pad|>": VIDEO_TOKEN}
"""Slots of the tiny vocabulary that LLaVA names differently."""

SPECIAL_TOKENS: tuple[str, ...] = tuple(RENAMED.get(t, t) for t in base.SPECIAL_TOKENS)
"""Special tokens in vocabulary order, from id `BASE_VOCAB`."""

VOCAB_SIZE = base.VOCAB_SIZE

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>\\n' }}{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'video' %}{{ '<video>\\n' }}{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""LLaVA-OneVision-style chat template: images (`<image>\\n` each) before the turn's text."""


def special_token_ids() -> dict[str, int]:
    """Id of every special token, e.g. {'<image>': 510, '<video>': 511, '<|im_end|>': 500, ...}."""
    return {tok: base.BASE_VOCAB + i for i, tok in enumerate(SPECIAL_TOKENS)}


def config_token_ids() -> dict[str, int]:
    """Token-id fields of a tiny LLaVA-OneVision config (the text config's and the top level's)."""
    ids = special_token_ids()
    return {
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "image_token_id": ids[IMAGE_TOKEN],
        "video_token_id": ids[VIDEO_TOKEN],
    }


def build_tokenizer():
    """The tiny LLaVA tokenizer as a transformers `Qwen2Tokenizer` (fast backend).

    pad = unk = `<|endoftext|>`, eos = `<|im_end|>`, with `CHAT_TEMPLATE`.
    """
    spec = json.loads(base._trained())
    for entry in spec["added_tokens"]:
        entry["content"] = RENAMED.get(entry["content"], entry["content"])
    return base.qwen2_tokenizer(json.dumps(spec), CHAT_TEMPLATE, special_token_ids(), "tiny LLaVA tokenizer")
