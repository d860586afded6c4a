"""Qwen3-VL family adapter (DESIGN §5) and its torchvision-free processor.

Where Qwen3-VL differs from Qwen2-VL / Qwen2.5-VL, and what that means here:

- Patches of 16 px, merged 2x2: one language-model vision token covers a 32x32 cell of the
  resized view. The image processor is Qwen2-VL's (Qwen3-VL's own `preprocessor_config.json`
  names `Qwen2VLImageProcessorFast`, with mean = std = 0.5), so the patch order is Qwen2-VL's:
  grouped by 2x2 merge block, the blocks row-major; the tower keeps that order (no window
  permutation: every block attends over the whole image), so the k-th `<|image_pad|>` of a
  view covers cell k, row-major, exactly as for Qwen2-VL (tests/test_qwen3_adapter.py).
  `QwenAdapter` is generic in the cell size, so `Qwen3Adapter` inherits its resize, grid,
  clip encoding and collation unchanged.
- Interleaved M-RoPE: the position ids are the same (t, h, w) triples as Qwen2-VL's (the model's
  own `get_rope_index`, which `model.qwen.rope_position_ids` runs on the CPU batch); the
  interleaving is in how the rotary embedding spreads the three axes over the frequencies, not
  in the ids.
- DeepStack: features of a few vision-tower blocks are added to the hidden states at the vision
  positions after each of the first LM layers. The hook on layer l's `q_proj` (model/wrapper.py)
  therefore reads what layer l's attention reads, DeepStack's addition included.
- Chat template: Qwen3-VL-Instruct's has no default system turn (`QWEN3_CHAT_TEMPLATE` is its
  structure for the tiny presets; a checkpoint brings its own). LM labels are data/chat.py's
  (DESIGN §5: each assistant turn's content + `<|im_end|>`); no system turn is added when the
  conversation has none.
- Thinking checkpoints (Qwen3-VL-*-Thinking): their template opens the last answer with a
  `<think>` block (empty for data without reasoning, as LLaVA-Video-178K's answers are) and drops
  the block from earlier answers, so a multi-turn conversation's text is not the concatenation of
  its turns and the think scaffolding has no place in "content + end of turn". Instruction
  samples are refused for such a template (`ConversationError` 'template', one line: use the
  Instruct checkpoint, or give the checkpoint a template without `<think>`), never labelled
  half-way; clips need no template answer and train as usual.
- Video: each temporal patch (two frames) is its own block `<t seconds><|vision_start|>
  <|video_pad|> x cells<|vision_end|>`, t the mean time of its two frames, and the model's
  `get_rope_index` gives every block its own temporal position (it splits `video_grid_thw` per
  temporal patch). `Qwen3VLProcessor.video_placeholder` writes that text (equal to transformers'
  `Qwen3VLProcessor.replace_video_token`, tested); the frames become patches through
  `model.qwen.video_patches` (no torchvision). The placeholder replaces the template's whole
  `<|vision_start|><|video_pad|><|vision_end|>`, as transformers 4.57 (the release Qwen3-VL came
  with) does; transformers 5.x's generic replacement substitutes only the pad and so nests one
  vision span inside another, which is not what the release processor writes.
  In a conversation the LM labels carry over that expansion as one unit: the template's
  `<|vision_start|><|video_pad|><|vision_end|>` (a user-turn span, never labelled) becomes the
  whole run of timestamp texts and vision spans, and every other token maps one to one
  (`Qwen3Adapter.encode_conversation`).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from transformers import BatchFeature

from data import chat
from model.presets import QWEN3_FAMILIES
from model.qwen import PROMPT, QwenAdapter, QwenVLProcessor, video_patches
from model.tokenizer import chat_template

HF_PROCESSOR_CLASS = "Qwen3VLProcessor"
"""The stock processor class both Qwen3-VL families save under (processor_config.json)."""

QWEN3_CHAT_TEMPLATE = chat_template(None)
"""Qwen3-VL-Instruct's chat template without tools: no default system turn (a system message is
rendered when given), images as `<|vision_start|><|image_pad|><|vision_end|>`, videos as
`<|vision_start|><|video_pad|><|vision_end|>` (the processor replaces that whole span)."""

IMAGE_MEAN = IMAGE_STD = (0.5, 0.5, 0.5)
"""Qwen3-VL's normalisation (its preprocessor_config.json), not CLIP's as in Qwen2-VL."""


def frame_group_times(timestamps: Sequence[float], temporal_patch_size: int) -> list[float]:
    """The time of each temporal patch: the mean of the first and last frame time of its group (an odd
    count repeats the last frame, as the patches do), as Qwen3-VL's processor computes it
    (transformers `Qwen3VLProcessor._calculate_timestamps`)."""
    ts = [float(t) for t in timestamps]
    if not ts:
        raise ValueError("a video needs at least one frame time")
    ts += [ts[-1]] * (-len(ts) % temporal_patch_size)
    return [(ts[i] + ts[i + temporal_patch_size - 1]) / 2 for i in range(0, len(ts), temporal_patch_size)]


class Qwen3VLProcessor(QwenVLProcessor):
    """Qwen3-VL processor for images, videos (with their frame times) and text, torchvision-free.

    Images go through the stock path (Qwen2-VL's processor: one `<|image_pad|>` per cell). A video is a
    list of frames of one size plus `timestamps` (seconds of each frame); the text's
    `<|vision_start|><|video_pad|><|vision_end|>` (or a bare `<|video_pad|>`) becomes
    `video_placeholder(...)`. Saved with `processor_class` Qwen3VLProcessor.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)
        self.hf_processor_class = HF_PROCESSOR_CLASS
        self.vision_start_token = getattr(tokenizer, "vision_start_token", None) or "<|vision_start|>"
        self.vision_end_token = getattr(tokenizer, "vision_end_token", None) or "<|vision_end|>"

    def video_placeholder(self, grid_thw: Sequence[int], timestamps: Sequence[float]) -> str:
        """The text of one video of grid (t, h, w) in patches: per temporal patch
        `<{time:.1f} seconds><|vision_start|>` + one `<|video_pad|>` per cell + `<|vision_end|>`."""
        t, h, w = (int(v) for v in grid_thw)
        merge = int(self.image_processor.merge_size) ** 2
        times = frame_group_times(timestamps, int(self.image_processor.temporal_patch_size))
        if len(times) != t:
            raise ValueError(f"{len(timestamps)} frame times for a video of {t} temporal patches")
        block = self.vision_start_token + self.video_token * (h * w // merge) + self.vision_end_token
        return "".join(f"<{s:.1f} seconds>{block}" for s in times)

    def __call__(self, images=None, text=None, videos=None, timestamps=None, **kwargs):
        """As the stock processor. `videos`: one list of frames per text (each text holding one video
        placeholder); `timestamps`: one list of frame times (seconds) per video, which the video text needs."""
        if videos is None:
            if timestamps is not None:
                raise ValueError("timestamps= goes with videos=: give the frames of each video too")
            return super().__call__(images=images, text=text, **kwargs)
        texts = self._video_texts(images, text, videos)
        if timestamps is None or len(timestamps) != len(videos):
            raise ValueError("Qwen3-VL writes each frame's time between the frames of a video: pass timestamps= "
                             "(one list of frame times in seconds per video)")
        return_tensors = kwargs.pop("return_tensors", "pt")
        ip_kwargs = {k: kwargs.pop(k) for k in ("do_resize", "min_pixels", "max_pixels") if k in kwargs}
        wrapped = self.vision_start_token + self.video_token + self.vision_end_token
        patches, grids, expanded = [], [], []
        for t, frames, ts in zip(texts, videos, timestamps):
            if t.count(self.video_token) != 1:
                raise ValueError(f"each text needs exactly one {self.video_token} (got {t.count(self.video_token)})")
            if len(ts) != len(frames):
                raise ValueError(f"{len(ts)} frame times for a video of {len(frames)} frames")
            pv, grid = video_patches(self.image_processor, frames, self.fast_images, **ip_kwargs)
            patches.append(pv)
            grids.append(grid)
            span = wrapped if wrapped in t else self.video_token
            expanded.append(t.replace(span, self.video_placeholder(grid[0].tolist(), ts), 1))
        enc = self.tokenizer(expanded, return_tensors=return_tensors, **kwargs)
        data = dict(enc)
        data["mm_token_type_ids"] = (enc["input_ids"] == self.video_token_id).long() * 2  # 0 text, 2 video
        data["pixel_values_videos"] = torch.cat(patches)
        data["video_grid_thw"] = torch.cat(grids)
        return BatchFeature(data)


def make_processor(image_processor, tokenizer, chat_template: str) -> Qwen3VLProcessor:
    """A `Qwen3VLProcessor` (it saves as the stock Qwen3VLProcessor class)."""
    return Qwen3VLProcessor(image_processor, tokenizer, chat_template=chat_template)


def build_image_processor(min_pixels: int, max_pixels: int, patch_size: int = 16, merge_size: int = 2,
                          temporal_patch_size: int = 2):
    """Qwen3-VL's image processor (Qwen2-VL's, with Qwen3-VL's patch size and normalisation), PIL backend."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=patch_size,
                                    merge_size=merge_size, temporal_patch_size=temporal_patch_size,
                                    image_mean=list(IMAGE_MEAN), image_std=list(IMAGE_STD))


class Qwen3Adapter(QwenAdapter):
    """Family adapter for Qwen3-VL and Qwen3-VL-MoE: 32x32-pixel cells, row-major (module docstring).

    Everything a clip needs is `QwenAdapter`'s (its cell size is the processor's patch x merge); what
    differs is the video text, which carries each frame's time (`video_kwargs`, which
    `QwenAdapter.encode_media_text` passes), and so how a video conversation's labels reach the
    expanded sequence (`encode_conversation`, `video_labels`).
    """

    def __init__(self, processor, *, family: str = "qwen3_vl", min_pixels: int | None = None,
                 max_pixels: int | None = None, prompt: str = PROMPT) -> None:
        if family not in QWEN3_FAMILIES:
            raise ValueError(f"Qwen3Adapter serves {', '.join(QWEN3_FAMILIES)}, not {family!r}")
        super().__init__(processor, family=family, min_pixels=min_pixels, max_pixels=max_pixels, prompt=prompt)
        self._thinking: bool | None = None

    def video_kwargs(self, timestamps: Sequence[float]) -> dict[str, Any]:
        """Processor arguments of ONE video whose frames lie at `timestamps` (seconds), beside `videos=[frames]`:
        Qwen3-VL writes `<t seconds>` before each temporal patch (Qwen2.5-VL instead takes
        `second_per_grid_ts`, Qwen2-VL nothing)."""
        return {"timestamps": [[float(t) for t in timestamps]]}

    # ------------------------------------------------------------ conversations
    @property
    def thinking_template(self) -> bool:
        """Whether the chat template writes `<think>` blocks (a Qwen3-VL Thinking checkpoint's): probed by
        rendering a one-turn exchange and a generation prompt."""
        if self._thinking is None:
            probe = [{"role": "user", "content": [{"type": "text", "text": "q"}]},
                     {"role": "assistant", "content": [{"type": "text", "text": "a"}]}]
            self._thinking = any("<think>" in self.render_chat(m, g) for m, g in ((probe, False), (probe[:1], True)))
        return self._thinking

    def encode_conversation(self, frames: Sequence[np.ndarray], media: str, conversation: Sequence[dict],
                            timestamps: Sequence[float] = (), *, max_len: int = 0,
                            video_frames: int = 16) -> dict[str, Any]:
        """`FamilyAdapter.encode_conversation` for Qwen3-VL: images and text as every family; a video's labels
        carried over its timestamped expansion (`video_labels`). Refuses a Thinking template (module docstring)."""
        if self.thinking_template:
            raise chat.ConversationError("template", "the chat template writes <think> blocks (a Qwen3-VL Thinking "
                                         "checkpoint): LM labels for answers without reasoning are not defined on "
                                         "it; fine-tune the Instruct checkpoint, or give the model directory a "
                                         "chat_template without <think>")
        if media != "video":
            return super().encode_conversation(frames, media, conversation, timestamps, max_len=max_len,
                                               video_frames=video_frames)
        messages = chat.to_messages(conversation, 0, 1)
        text, spans = chat.assistant_spans(self.render_chat, messages, self.end_of_turn)
        item = self.encode_media_text(text, frames, media, timestamps, video_frames)
        ids, labels = chat.token_labels(self.processor.tokenizer, text, spans)
        item["labels"] = self.video_labels(item["input_ids"], ids, labels)
        item = chat.truncate(item, max_len, self.media_token_ids)
        item["cell_pos"] = []
        return item

    def video_labels(self, expanded: torch.Tensor, ids: Sequence[int], labels: Sequence[int]) -> torch.Tensor:
        """Labels (S,) of the processor's `expanded` ids of a one-video text from the labels of its unexpanded
        `ids`: the template's `<|vision_start|><|video_pad|><|vision_end|>` became, per temporal patch,
        `<t seconds><|vision_start|><|video_pad|> x cells<|vision_end|>`; that whole run (from the first
        timestamp to the last `<|vision_end|>`) is matched as one media unit by `chat.expand_labels`, which
        checks that every other token maps one to one (a special token ends a text piece, so the text on
        either side tokenizes alike). Raises ConversationError when the text is not of that form."""
        tok = self.processor.tokenizer
        vs, ve = (int(tok.convert_tokens_to_ids(t)) for t in (self.processor.vision_start_token,
                                                             self.processor.vision_end_token))
        vp = self.video_token_id
        ids, exp = [int(t) for t in ids], expanded.tolist()
        if ids.count(vp) != 1:
            raise chat.ConversationError("tokenization", f"{ids.count(vp)} video placeholders in the chat text "
                                         "of a one-video conversation")
        i = ids.index(vp)
        if ids[i - 1:i + 2] != [vs, vp, ve]:
            raise chat.ConversationError("tokenization", "the chat template does not wrap the video in "
                                         "<|vision_start|><|video_pad|><|vision_end|>: labels cannot be placed")
        a = i - 1  # where the expansion starts in both sequences (the tokens before it are the same)
        b = max(k for k, t in enumerate(exp) if t == vp) + 2  # after the last block's <|vision_end|>
        if b > len(exp) or exp[b - 1] != ve:
            raise chat.ConversationError("tokenization", "the processor's video text does not end in "
                                         "<|vision_end|>: labels cannot be placed")
        one = [vp]  # the video, one media unit on either side
        got = chat.expand_labels(torch.tensor(exp[:a] + one + exp[b:]), ids[:a] + one + ids[i + 2:],
                                 list(labels[:a]) + [chat.IGNORE] + list(labels[i + 2:]), one)
        return torch.cat([got[:a], torch.full((b - a,), chat.IGNORE, dtype=torch.long), got[a + 1:]])
