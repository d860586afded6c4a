"""A tiny Qwen-style tokenizer, built locally (no download) for the tiny presets.

A byte-level BPE (Qwen2's pre-tokenizer regex, NFC normaliser, byte-level decoder) is
trained with the `tokenizers` library on a small built-in English corpus to
`BASE_VOCAB` entries; Qwen's special tokens follow at `BASE_VOCAB + i`, in the same
order as in the real Qwen2-VL vocabulary (where they start at 151643). So the tiny
vocabulary has `VOCAB_SIZE = BASE_VOCAB + len(SPECIAL_TOKENS)` entries and e.g.
`<|image_pad|>` sits at `BASE_VOCAB + 12` (real: 151655).

Training is deterministic: the corpus is generated from fixed word lists, so the same
vocabulary, merges and saved files come out every time.
"""
from __future__ import annotations

import functools

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

BASE_VOCAB = 498
"""Byte-level BPE entries (256 bytes + merges) before the special tokens."""

SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)
"""Qwen2-VL's special tokens in vocabulary order (real ids 151643 ... 151656)."""

VOCAB_SIZE = BASE_VOCAB + len(SPECIAL_TOKENS)

# Qwen2's pre-tokenisation split (contractions, letters, single digits, punctuation, spaces).
_SPLIT_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
                r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")

DEFAULT_SYSTEM = "You are a helpful assistant."

def chat_template(default_system: str | None) -> str:
    """The Qwen-style chat template: each message as <|im_start|>role ... <|im_end|>, image / video parts as
    their vision placeholders; with `default_system`, a system turn of that text first when the
    conversation has none."""
    system = ("{% if loop.first and message['role'] != 'system' %}"
              "{{ '<|im_start|>system\\n" + default_system + "<|im_end|>\\n' }}"
              "{% endif %}") if default_system is not None else ""
    return "{% for message in messages %}" + system + _CHAT_TURN


_CHAT_TURN = (
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'video' %}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHAT_TEMPLATE = chat_template(DEFAULT_SYSTEM)
"""Qwen-style chat template: a default system turn, images as
`<|vision_start|><|image_pad|><|vision_end|>` (the processor expands `<|image_pad|>`)."""


def special_token_ids() -> dict[str, int]:
    """Id of every special token in the tiny vocabulary, e.g. {'<|image_pad|>': 510, ...}."""
    return {tok: BASE_VOCAB + i for i, tok in enumerate(SPECIAL_TOKENS)}


def config_token_ids() -> dict[str, int]:
    """The token-id fields of a Qwen2-VL / Qwen2.5-VL config for the tiny vocabulary."""
    ids = special_token_ids()
    return {
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
    }


_WORDS = (
    "the a an of in on to and with from for by at is are was be this that these those it its "
    "two one three four five six seven eight nine ten view views frame frames image images scene "
    "scenes same different camera cameras point points depth pixel pixels room rooms wall walls "
    "floor ceiling door window table chair chairs sofa bed lamp shelf kitchen desk plant box "
    "left right up down near far front back behind above below between inside outside corner "
    "red green blue white black gray yellow wooden metal glass light dark small large tall "
    "see show shows look looks move moves turn turns match matches count measure distance "
    "how many where what which who why when there here you are helpful assistant user system "
    "question answer describe object objects space spatial geometry correspondence video "
    "model language vision token tokens layer layers head heads train training data"
).split()

_SENTENCES = (
    "You are a helpful assistant.",
    "Two views of the same scene.",
    "How many chairs are in the room?",
    "Which object is closer to the camera?",
    "The table is to the left of the sofa.",
    "Describe the scene in one sentence.",
    "What is the distance between the door and the window?",
    "There are 3 chairs, 2 tables and 1 lamp.",
)


def _corpus(n_lines: int = 400) -> list[str]:
    """A fixed pseudo-text corpus: word sequences, a few full sentences and numbers."""
    n = len(_WORDS)
    lines = list(_SENTENCES)
    for i in range(n_lines):
        k = 5 + i % 7
        words = [_WORDS[(i * 31 + j * (i % 13 + 1) * 7) % n] for j in range(k)]
        line = " ".join(words).capitalize() + (".", "?", "!", ",")[i % 4]
        lines.append(line + f" {i} {i * 37 % 1000}.")
    return lines


@functools.lru_cache(maxsize=1)
def _trained() -> str:
    """The trained tokenizer as JSON (cached: training takes a fraction of a second)."""
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BASE_VOCAB, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[])
    tok.train_from_iterator(_corpus(), trainer=trainer)
    if tok.get_vocab_size() != BASE_VOCAB:
        raise RuntimeError(f"tiny tokenizer trained to {tok.get_vocab_size()} entries, expected {BASE_VOCAB}")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok.to_str()


def build_tokenizer():
    """The tiny Qwen-style tokenizer as a transformers `Qwen2Tokenizer` (fast backend).

    pad = unk = `<|endoftext|>`, eos = `<|im_end|>` (as Qwen2-VL-Instruct), with
    `CHAT_TEMPLATE`. Special-token ids: `special_token_ids()`.
    """
    return qwen2_tokenizer(_trained(), CHAT_TEMPLATE, special_token_ids(), "tiny tokenizer")


def qwen2_tokenizer(spec: str, chat_template: str, ids: dict[str, int], what: str):
    """A transformers `Qwen2Tokenizer` over the tiny BPE `spec` (tokenizer.json text): pad = unk =
    `<|endoftext|>`, eos = `<|im_end|>`; RuntimeError unless every special token of `ids` has its id
    and the vocabulary has VOCAB_SIZE entries."""
    from transformers import Qwen2Tokenizer

    tok = Qwen2Tokenizer(tokenizer_object=Tokenizer.from_str(spec), unk_token="<|endoftext|>",
                         eos_token="<|im_end|>", pad_token="<|endoftext|>",
                         chat_template=chat_template, model_max_length=32768)
    got = {t: tok.convert_tokens_to_ids(t) for t in ids}
    if got != ids or len(tok) != VOCAB_SIZE:
        raise RuntimeError(f"{what} special ids {got} (size {len(tok)}) differ from {ids}")
    return tok
