"""The family-adapter interface (DESIGN §2, §5).

`data/` declares it; `model/` implements it per VLM family (Qwen2-VL, Qwen2.5-VL,
LLaVA-OneVision, LLaVA-NeXT-Video, ...). The loader knows only this interface: how a stored
view is resized, which cell of the resized image each vision token covers, and where each
frame's vision tokens sit in the sequence of its clip.

Cell convention (DESIGN §5): a point at resized pixel (u', v') lies in cell
`(row, col) = (floor((v' + 0.5) / cell_px), floor((u' + 0.5) / cell_px))`; cells are
numbered row-major, `index = row * cols + col`. Points outside the grid have no cell.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np


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

    @abc.abstractmethod
    def collate(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Batch the outputs of `encode_clip` (padding the sequences).

        Sequence positions in `cell_pos` stay valid for the padded batch (the adapter shifts
        them if it pads on the left); keys the adapter does not batch are gathered into lists.
        """

    @abc.abstractmethod
    def model_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The part of a collated batch that goes into the model's forward."""
