"""Where an image's views sit: square boxes in source pixels, each brought to the model size.

A view is a square ``(left, top, side)`` of the decoded image; preprocessing resizes it to
``image_size`` only when ``side`` differs (the ``resize`` view, or an image smaller than the
crop). Native-resolution crops are never upscaled, and their offsets sit on the ``grid``
(pixel-grid phase: JPEG's 8x8 blocks and x2/x4 upsampler traces keep their alignment).
The number of boxes never exceeds ``views``, whatever the image's size or shape, so a
1 x 4000 strip and a 40-megapixel photo cost the same bounded work.
"""

from __future__ import annotations

import math
from typing import NamedTuple


class Box(NamedTuple):
    """A square window of the source image, in pixels."""

    left: int
    top: int
    side: int

    def pil(self) -> tuple[int, int, int, int]:
        return (self.left, self.top, self.left + self.side, self.top + self.side)


def _snap(offset: int, grid: int) -> int:
    return offset - offset % grid


def _spread(room: int, n: int) -> list[int]:
    """``n`` evenly spaced offsets from 0 to ``room`` inclusive."""
    if n <= 1 or room <= 0:
        return [room // 2]
    return [round(room * i / (n - 1)) for i in range(n)]


def centre_box(width: int, height: int, side: int, grid: int = 1) -> Box:
    """The centred square of ``side`` (offsets snapped to ``grid``)."""
    return Box(_snap((width - side) // 2, grid), _snap((height - side) // 2, grid), side)


def crop_boxes(width: int, height: int, side: int, count: int, grid: int = 1) -> list[Box]:
    """Up to ``count`` distinct native crops: centre, then the corners, then finer grids.

    Never more than ``count`` boxes and never more than the distinct grid-aligned positions
    the image has room for; the loop is bounded by ``count``, not by the image size.
    """
    rx, ry = width - side, height - side
    candidates = [(rx // 2, ry // 2), (0, 0), (rx, 0), (0, ry), (rx, ry)]
    cells = 3
    while len(candidates) < count + 5 and cells <= math.isqrt(count) + 3:
        candidates += [(x, y) for y in _spread(ry, cells) for x in _spread(rx, cells)]
        cells += 1
    boxes: list[Box] = []
    for x, y in candidates:
        box = Box(_snap(x, grid), _snap(y, grid), side)
        if box not in boxes:
            boxes.append(box)
        if len(boxes) == count:
            break
    return boxes


def strip_boxes(width: int, height: int, count: int) -> list[Box]:
    """Up to ``count`` squares of the short side along the long axis: centre, ends, between."""
    side = min(width, height)
    room = max(width, height) - side
    offsets = [room // 2, 0, room, *_spread(room, max(2, count))]
    boxes: list[Box] = []
    for offset in offsets:
        box = Box(offset, 0, side) if width >= height else Box(0, offset, side)
        if box not in boxes:
            boxes.append(box)
        if len(boxes) == count:
            break
    return boxes
