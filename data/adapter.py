"""The family-adapter interface (DESIGN §2, §5).

`data/` declares it; `model/` implements it per VLM family (Qwen2-VL, Qwen2.5-VL,
LLaVA-OneVision, LLaVA-NeXT-Video, ...). The loader knows only this interface: how a stored
view is resized, which cell of the resized image each vision token covers, where each
frame's vision tokens sit in the sequence of its clip, and how a conversation becomes the
family's chat text with LM labels (`encode_conversation`, through `data.chat`).

Cell convention (DESIGN §5): a point at resized pixel (u', v') lies in cell
`(row, col) = (floor((v' + 0.5) / cell_px), floor((u' + 0.5) / cell_px))`; cells are
numbered row-major, `index = row * cols + col`. Points outside the grid have no cell.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Sequence

import math

import numpy as np

from data import chat


def batch_cat(parts: Sequence[Any]) -> Any:
    """`torch.cat(parts, 0)` for a batch's media tensors; inside a DataLoader worker the result is
    allocated in shared memory (as torch's own `default_collate` does), so the batch reaches the
    trainer as a handle: pickling a private tensor would copy it into shared memory first, and a
    batch of 8-frame clips at the 7B budget carries ~120 MB of pixels."""
    import torch

    if not parts:
        raise ValueError("batch_cat needs at least one tensor")
    first = parts[0]
    if torch.utils.data.get_worker_info() is None or first.device.type != "cpu":
        return torch.cat(list(parts), 0)
    shape = (sum(int(p.shape[0]) for p in parts), *first.shape[1:])
    storage = first._typed_storage()._new_shared(math.prod(shape), device=first.device)
    out = first.new(storage).view(shape)
    return torch.cat(list(parts), 0, out=out)


@dataclass(frozen=True)
class CellGrid:
    """How one resized view is cut into the cells of its vision tokens."""

    size: tuple[int, int]
    """(W', H') of the resized image the processor feeds the vision tower."""
    cell_px: int
    """Side of one cell (one language-model vision token) in resized pixels."""
    rows: int
    cols: int

    @property
    def n_cells(self) -> int:
        return self.rows * self.cols


class FamilyAdapter(abc.ABC):
    """What the loader needs to know about one VLM family."""

    family: str = "?"

    @abc.abstractmethod
    def grid(self, size: tuple[int, int]) -> CellGrid:
        """Cell grid of a stored view of size (W, H) after the processor's resize."""

    @abc.abstractmethod
    def max_cells(self) -> int:
        """The most cells one view can have after the resize (its pixel budget over the cell area):
        what memory guards size the similarity tensors by."""

    @abc.abstractmethod
    def encode_clip(self, frames: Sequence[np.ndarray]) -> dict[str, Any]:
        """Model inputs for one clip (K uint8 (H, W, 3) frames, in order), unbatched: DESIGN §5.

        The K frames go to the VLM as K images of one sequence (LLaVA-NeXT-Video: one video of K
        frames, each with its own pooled grid). Returns a dict of tensors (whatever the family's
        forward needs: input_ids, pixel_values, image_grid_thw, mm_token_type_ids, ...) plus
        `cell_pos`: a list of K LongTensors, frame k's (rows_k * cols_k,): the sequence position
        of each of its cells' vision token, row-major.
        """

    def encode_pair(self, rgb_a: np.ndarray, rgb_b: np.ndarray) -> dict[str, Any]:
        """`encode_clip` of two frames, with their cell positions also as `cell_pos_a` / `cell_pos_b`."""
        item = self.encode_clip([rgb_a, rgb_b])
        item["cell_pos_a"], item["cell_pos_b"] = item["cell_pos"]
        return item

    # ------------------------------------------------------------- conversations
    end_of_turn: str = chat.END_OF_TURN
    """The chat template's end-of-turn token (labelled with each assistant turn, DESIGN §5)."""

    @property
    @abc.abstractmethod
    def media_token_ids(self) -> tuple[int, ...]:
        """Ids of the placeholder tokens the processor expands into media tokens (image, video)."""

    def render_chat(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """The family's chat template applied to `messages` (text, not tokens)."""
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    @abc.abstractmethod
    def encode_media_text(self, text: str, frames: Sequence[np.ndarray], media: str, timestamps: Sequence[float],
                          video_frames: int) -> dict[str, Any]:
        """The processor's encoding of a chat `text` with its media ('image': the frames are the
        images in order; 'video': the frames of one video; 'none'): input_ids, attention_mask and
        the family's media inputs, unbatched. `video_frames` caps (or, where the family needs one
        count per batch, fixes) the frames a video is given with."""

    def encode_conversation(self, frames: Sequence[np.ndarray], media: str, conversation: Sequence[dict],
                            timestamps: Sequence[float] = (), *, max_len: int = 0,
                            video_frames: int = 16) -> dict[str, Any]:
        """Model inputs of one LLaVA conversation with its media, with `labels` (S,) (DESIGN §5), unbatched.

        Raises `chat.ConversationError` (with a reason) for a conversation that cannot be encoded.
        `cell_pos` is [] (no frame of a conversation is supervised by the geometry losses).
        """
        n_img = len(frames) if media == "image" else 0
        messages = chat.to_messages(conversation, n_img, 1 if media == "video" else 0)
        text, spans = chat.assistant_spans(self.render_chat, messages, self.end_of_turn)
        item = self.encode_media_text(text, frames, media, timestamps, video_frames)
        ids, labels = chat.token_labels(self.processor.tokenizer, text, spans)
        item["labels"] = chat.expand_labels(item["input_ids"], ids, labels, self.media_token_ids)
        item = chat.truncate(item, max_len, self.media_token_ids)
        item["cell_pos"] = []
        return item

    # ------------------------------------------------------------- vision calls
    def vision_calls(self, batch: dict[str, Any]) -> int:
        """How many times the model's forward runs its vision tower on this batch (one per media kind
        present). Under ZeRO-3 every rank must run it equally often (`dummy_vision_inputs`)."""
        return sum(batch.get(k) is not None for k in ("pixel_values", "pixel_values_videos"))

    @abc.abstractmethod
    def dummy_vision_inputs(self) -> tuple[str, dict[str, Any]]:
        """(name of the model body's feature method, its keyword arguments) for the smallest real input
        of its vision tower: run on a micro-batch with fewer vision calls than another rank's, its
        output enters the loss times zero (DESIGN §6)."""

    @abc.abstractmethod
    def collate(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Batch the outputs of `encode_clip` / `encode_conversation` (padding the sequences; `labels`
        padded with -100, and all -100 for a clip).

        Sequence positions in `cell_pos` stay valid for the padded batch (the adapter shifts
        them if it pads on the left); keys the adapter does not batch are gathered into lists.
        """

    @abc.abstractmethod
    def model_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The part of a collated batch that goes into the model's forward."""
