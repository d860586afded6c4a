"""LLaVA conversations -> chat messages -> token labels, for every family (DESIGN §5; the adapters call it).

An instruction sample's conversation is a list of LLaVA turns `{"from": "human" | "gpt" |
"system", "value": "..."}` whose human turns hold `<image>` / `<video>` placeholders. The
adapters turn it into the family's inputs in three steps, all here except the processor call:

1. `to_messages`: turns -> chat messages (`user` / `assistant` / `system`), each placeholder a
   `{"type": "image"}` / `{"type": "video"}` part where it stands. The one newline that the LLaVA
   convention puts after a placeholder (`"<image>\\nWhat is ..."`) is dropped (the templates
   separate media from text themselves). The placeholder counts must equal the media counts.
2. `assistant_spans`: the text of the family's own chat template and the character spans that
   carry labels: each assistant turn's content plus its end-of-turn token (`<|im_end|>` for the
   Qwen-style templates), found by rendering the conversation up to each assistant turn with and
   without that turn (a template that does not render conversations incrementally is refused).
3. `expand_labels`: the processor expands each media placeholder into the tokens of that image
   or video; the labels of the unexpanded text (from the tokenizer's offsets) are carried onto
   the expanded sequence by walking both, each run of media tokens matched as one unit, so
   media tokens never carry labels. `truncate` then cuts a sequence that is too long (never
   inside or before its media).

A label is the id of a token inside a span, -100 elsewhere (system and user turns, the
assistant role header, the newline after the end-of-turn token, media, padding). The LM item
count of a sample is the number of labelled positions the shifted loss uses,
`(labels[1:] != -100).sum()`.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import torch

IGNORE = -100
"""The label of a position that carries no LM loss (the Hugging Face convention)."""

END_OF_TURN = "<|im_end|>"
"""The end-of-turn token of the Qwen-style chat templates (Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision, SmolLM2)."""

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
PLACEHOLDERS = {"<image>": "image", "<video>": "video"}
_SPLIT = re.compile(r"(<image>|<video>)")


class ConversationError(ValueError):
    """A conversation that cannot be turned into model inputs (one line, naming the cause)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def to_messages(conversation: Sequence[dict[str, Any]], n_images: int = 0, n_videos: int = 0) -> list[dict]:
    """LLaVA turns -> chat messages with image / video parts where the placeholders stand.

    Raises ConversationError when a turn has an unknown role or no text, there is no assistant
    turn, a placeholder sits outside a user turn, or the placeholder counts differ from the media.
    """
    messages, seen = [], {"image": 0, "video": 0}
    for t, turn in enumerate(conversation):
        if not isinstance(turn, dict) or turn.get("from") not in ROLES or not isinstance(turn.get("value"), str):
            raise ConversationError("bad_turn", f"turn {t} is not {{'from': human|gpt|system, 'value': str}}")
        role = ROLES[turn["from"]]
        parts: list[dict[str, Any]] = []
        after_media = False
        for piece in _SPLIT.split(turn["value"]):
            if piece in PLACEHOLDERS:
                if role != "user":
                    raise ConversationError("bad_placeholder", f"turn {t} ({turn['from']}) holds a {piece} placeholder")
                seen[PLACEHOLDERS[piece]] += 1
                parts.append({"type": PLACEHOLDERS[piece]})
                after_media = True
                continue
            if after_media and piece.startswith("\n"):
                piece = piece[1:]
            after_media = False
            if piece:
                parts.append({"type": "text", "text": piece})
        messages.append({"role": role, "content": parts})
    if not any(m["role"] == "assistant" for m in messages):
        raise ConversationError("no_assistant_turn", "the conversation has no assistant (gpt) turn")
    if (seen["image"], seen["video"]) != (n_images, n_videos):
        raise ConversationError("placeholder_mismatch", f"{seen['image']} <image> and {seen['video']} <video> "
                                f"placeholders for {n_images} image(s) and {n_videos} video(s)")
    return messages


def assistant_spans(render: Callable[..., str], messages: list[dict],
                    end_of_turn: str = END_OF_TURN) -> tuple[str, list[tuple[int, int]]]:
    """(the template's text of `messages`, character spans [start, end) that carry labels).

    `render(messages, add_generation_prompt)` is the processor's `apply_chat_template(...,
    tokenize=False)`. A span starts after the assistant header (the text the template adds for
    `add_generation_prompt=True`) and ends after the turn's end-of-turn token.
    """
    text = render(messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = render(messages[:i], True)
        upto = render(messages[: i + 1], False)
        if not (text.startswith(prefix) and text.startswith(upto) and upto.startswith(prefix)):
            raise ConversationError("template", "the chat template does not render a conversation incrementally "
                                    "(its text up to an assistant turn is not a prefix of the whole); labels "
                                    "cannot be placed")
        end = upto.rfind(end_of_turn)
        if end < len(prefix):
            raise ConversationError("template", f"the chat template ends an assistant turn without {end_of_turn}")
        spans.append((len(prefix), end + len(end_of_turn)))
    return text, spans


def token_labels(tokenizer, text: str, spans: Sequence[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """(ids, labels) of `text` tokenized as the processor does; a token overlapping a span is labelled."""
    enc = tokenizer(text, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    labels = []
    for tok, (s, e) in zip(ids, offsets):
        inside = e > s and any(s < b and e > a for a, b in spans)
        labels.append(int(tok) if inside else IGNORE)
    return ids, labels


def expand_labels(expanded: torch.Tensor, ids: Sequence[int], labels: Sequence[int],
                  media_ids: Sequence[int]) -> torch.Tensor:
    """Carry `labels` of the unexpanded `ids` onto the processor's `expanded` ids (1-D).

    Non-media tokens correspond one to one; each maximal run of media tokens in one matches one
    maximal run in the other (its expansion). Raises ConversationError if the two disagree.
    """
    media = set(int(m) for m in media_ids)
    exp = expanded.tolist()
    out = torch.full((len(exp),), IGNORE, dtype=torch.long)
    i = j = 0
    while i < len(ids) and j < len(exp):
        if ids[i] in media:
            if exp[j] not in media:
                break
            while i < len(ids) and ids[i] in media:
                i += 1
            while j < len(exp) and exp[j] in media:
                j += 1
            continue
        if ids[i] != exp[j]:
            break
        out[j] = labels[i]
        i += 1
        j += 1
    if i != len(ids) or j != len(exp):
        raise ConversationError("tokenization", f"the processor's tokens differ from the chat text's at token {j} "
                                f"(expanded) / {i} (text): labels cannot be placed")
    return out


def lm_items(labels: torch.Tensor) -> int:
    """Labelled positions the shifted loss uses: (labels[..., 1:] != -100).sum()."""
    return int((labels[..., 1:] != IGNORE).sum())


def truncate(item: dict[str, Any], max_len: int, media_ids: Sequence[int]) -> dict[str, Any]:
    """Cut the sequence keys of an unbatched item (input_ids, attention_mask, mm_token_type_ids, labels)
    to `max_len` tokens. Refuses (ConversationError 'too_long') when the cut falls at or before the
    last media token, or leaves no labelled position."""
    n = int(item["input_ids"].shape[0])
    if not max_len or n <= max_len:
        return item
    is_media = torch.isin(item["input_ids"], torch.tensor(list(media_ids), dtype=item["input_ids"].dtype))
    last = int(torch.nonzero(is_media).max()) if bool(is_media.any()) else -1
    if last >= max_len:
        raise ConversationError("too_long", f"{n} tokens, its media end at token {last + 1}: over the "
                                f"--max-seq-len {max_len} (raise it, or store fewer frames)")
    out = dict(item)
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "labels"):
        if key in out:
            out[key] = out[key][:max_len]
    if lm_items(out["labels"]) == 0:
        raise ConversationError("too_long", f"{n} tokens: cut to --max-seq-len {max_len}, no labelled token is left")
    return out


def resample(n: int, count: int) -> list[int]:
    """`count` indices spread uniformly over range(n) (repeating when n < count), in order."""
    if n <= 0 or count <= 0:
        return []
    return [min(n - 1, int((k + 0.5) * n / count)) for k in range(count)]
