"""Greedy generation for a batch of (images, text) questions with the model's chat template.

As lmms-eval's Qwen2.5-VL model (EvolvingLMMs-Lab/lmms-eval
lmms_eval/models/simple/qwen2_5_vl.py) does: one user turn whose content is the
images (`{"type": "image"}` each) followed by the text, `apply_chat_template(...,
add_generation_prompt=True)` (the template's default system turn "You are a helpful
assistant."), left padding, `generate(do_sample=False, num_beams=1,
max_new_tokens=N, eos_token_id=tokenizer.eos_token_id)`, the new tokens decoded with
`skip_special_tokens=True, clean_up_tokenization_spaces=False` and cut at the decoded
end-of-turn token. Images are resized by the family adapter (Qwen's smart_resize,
bicubic, to the `--max-pixels` budget; LLaVA-OneVision: the tower's square input, as in
training) before the processor. LLaVA-OneVision gets each request's images as one nested
list, the processor's multi-image path (one base patch per image, no any-resolution
crops: the setting GASP trains it in); a request with a single image takes the
processor's single-image path (any-resolution), as that model's own inference does.
Qwen3-VL as lmms-eval's Qwen3-VL wrapper (lmms_eval/models/simple/qwen3_vl.py): the same, with
an explicit system turn on the lmms-eval benchmarks (`references.lmms_eval_system`: its template has no
default one) and, for a video, each temporal patch's time as text (`<t seconds>`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

@dataclass
class Request:
    """One question for the model: its images, in order, and its text."""

    images: list
    text: str
    video_seconds: float | None = None
    """Set: `images` are a video's frames, sampled uniformly over this many seconds, given to the
    model as one video input (Qwen's temporal patches and time positions)."""
    system: str | None = None
    """A system turn before the user turn (None: none, or the template's default one)."""


def chat_text(processor, n_images: int, text: str, video: bool = False, system: str | None = None) -> str:
    """The templated prompt of one user turn [image x n, text] (or [video, text]) plus the generation prompt,
    after a system turn when `system` is given."""
    content: list[dict[str, Any]] = [{"type": "video"}] if video else [{"type": "image"} for _ in range(n_images)]
    content.append({"type": "text", "text": text})
    messages = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": content}]
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_video(processor, requests: Sequence[Request], resized: bool, time_positions: bool,
                 timestamps: bool = False) -> dict:
    """Left-padded inputs of a batch of video requests (Qwen: `QwenVLProcessor(videos=...)`).

    time_positions (Qwen2.5-VL): `second_per_grid_ts` = temporal patch size x seconds per
    sampled frame, what qwen_vl_utils passes for frames sampled at n / duration fps.
    timestamps (Qwen3-VL): each frame's time for the `<t seconds>` text, frame k of n sampled
    uniformly over S seconds at k S / n (the same spacing).
    """
    texts = [chat_text(processor, 0, r.text, video=True, system=r.system) for r in requests]
    kwargs: dict[str, Any] = dict(text=texts, videos=[list(r.images) for r in requests], padding=True,
                                  padding_side="left", return_tensors="pt")
    if resized:
        kwargs["do_resize"] = False
    if time_positions:
        tps = int(processor.image_processor.temporal_patch_size)
        kwargs["second_per_grid_ts"] = [tps * r.video_seconds / max(len(r.images), 1) for r in requests]
    if timestamps:
        kwargs["timestamps"] = [[k * r.video_seconds / len(r.images) for k in range(len(r.images))]
                                for r in requests]
    return dict(processor(**kwargs))


def encode(processor, requests: Sequence[Request], resized: bool,
           per_request: bool = False) -> dict[str, torch.Tensor]:
    """Left-padded model inputs of a batch (all images of all requests, in order; `per_request`:
    one list of images per request, for processors that group images by prompt)."""
    texts = [chat_text(processor, len(r.images), r.text, system=r.system) for r in requests]
    images: list = [list(r.images) for r in requests] if per_request else [im for r in requests for im in r.images]
    kwargs: dict[str, Any] = dict(text=texts, padding=True, padding_side="left", return_tensors="pt")
    if any(r.images for r in requests):
        kwargs["images"] = images
        if resized:
            kwargs["do_resize"] = False
    return dict(processor(**kwargs))


@torch.no_grad()
def generate_batch(model, processor, requests: Sequence[Request], *, max_new_tokens: int,
                   device: torch.device | str, resized: bool = True) -> list[str]:
    """Greedy answers of a batch of requests (decoded new tokens, one string each)."""
    tok = processor.tokenizer
    model_type = getattr(model.config, "model_type", "")
    videos = [r.video_seconds is not None for r in requests]
    if any(videos):
        if not all(videos):
            raise ValueError("a batch mixes video and image requests")
        inputs = encode_video(processor, requests, resized, time_positions=model_type == "qwen2_5_vl",
                              timestamps=model_type in ("qwen3_vl", "qwen3_vl_moe"))
    else:
        inputs = encode(processor, requests, resized, per_request=model_type == "llava_onevision")
    inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out = model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                         temperature=None, top_p=None, top_k=None,
                         eos_token_id=tok.eos_token_id, pad_token_id=pad_id)
    new_tokens = out[:, inputs["input_ids"].shape[1]:]  # (B, <= max_new_tokens), left padding: prompt ends together
    answers = processor.batch_decode(new_tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    until = tok.decode([tok.eos_token_id]) if tok.eos_token_id is not None else ""
    return [a.split(until)[0] if until else a for a in answers]
