"""How training examples appear in the report: the renderer protocol and the default renderer."""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Mapping
from html import escape
from typing import Any

import numpy as np
import torch
from matplotlib.image import imsave

from source_callback.report.page import png_image

Renderer = Callable[[str, int, Any], str]
"""``renderer(stage_name, index, item) -> str``: an HTML fragment showing one training example.

``item`` is ``dataset[index]`` of the stage's training set. The fragment is inserted as is: a
renderer must escape text (:func:`html.escape`) and embed images as data URIs (the page loads
nothing from outside itself).
"""

MAX_TEXT = 300


def image_png(image: np.ndarray) -> bytes:
    """A PNG with one pixel per value: gray for ``[height, width]``, colour for ``[h, w, 3]``.

    Parameters
    ----------
    image
        The image; a gray one is scaled from its minimum (black) to its maximum (white).

    Returns
    -------
    bytes
        The PNG file's bytes.

    """
    buffer = io.BytesIO()
    imsave(buffer, image, cmap="gray", format="png")
    return buffer.getvalue()


def _as_array(value: Any) -> np.ndarray | None:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return (value.float() if value.dtype == torch.bfloat16 else value).numpy()
    if isinstance(value, np.ndarray) or hasattr(value, "__array_interface__"):  # PIL images too
        return np.asarray(value)
    return None


def as_image(value: Any) -> np.ndarray | None:
    """``value`` as an image array when it looks like one, else ``None``.

    Parameters
    ----------
    value
        A tensor, array or PIL image.

    Returns
    -------
    numpy.ndarray or None
        ``[height, width]`` or ``[height, width, 3]`` (scaled to ``[0, 1]``) for: a floating
        point array that is 2-D, a flattened square (``[784]`` → 28 × 28), or channels-first or
        -last with 1 or 3 channels; a ``uint8`` array of at least 2 dimensions likewise.
        Integer vectors (token ids) and anything else give ``None``.

    """
    array = _as_array(value)
    if array is None or array.size < 4:
        return None
    floating = np.issubdtype(array.dtype, np.floating)
    if not floating and not (array.dtype == np.uint8 and array.ndim >= 2):
        return None
    array = np.squeeze(array).astype(np.float64)
    if array.ndim == 3 and array.shape[0] == 3 and array.shape[-1] != 3:
        array = np.moveaxis(array, 0, -1)
    if array.ndim == 3 and array.shape[-1] == 3:
        low, high = np.nanmin(array), np.nanmax(array)
        return (array - low) / (high - low) if high > low else np.zeros_like(array)
    if array.ndim == 1 and math.isqrt(array.size) ** 2 == array.size:
        side = math.isqrt(array.size)
        return array.reshape(side, side)
    return array if array.ndim == 2 else None


def _text(value: Any) -> str:
    """``value`` as short text: tensors and arrays as (nested) lists, at most ``MAX_TEXT``."""
    array = _as_array(value)
    if array is not None:
        value = array.tolist()
    text = value if isinstance(value, str) else str(value)
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 1] + "…"


def render_value(value: Any, alt: str) -> str:
    """One value of a training example as HTML: a thumbnail for an image, else escaped text.

    Parameters
    ----------
    value
        A tensor, array, string, number, ...
    alt
        Alternative text of a thumbnail.

    Returns
    -------
    str
        An ``<img>`` (see :func:`as_image`) or a ``<span class="text">``.

    """
    image = as_image(value)
    if image is not None:
        return png_image(image_png(image), alt, css_class="example")
    return f'<span class="text">{escape(_text(value))}</span>'


def default_renderer(stage: str, index: int, item: Any) -> str:
    """The default way a training example is shown in the report.

    Parameters
    ----------
    stage
        Name of the stage whose training set holds the example.
    index
        The example's index in that training set.
    item
        ``dataset[index]``: a tuple (``(input, target)``: each part shown in turn), a mapping
        (each entry shown as ``key: value``), or a single value.

    Returns
    -------
    str
        An HTML fragment: images (:func:`as_image`) as PNG thumbnails, everything else, such as
        token ids or text, as escaped text of at most ``MAX_TEXT`` characters.

    """
    alt = f"{stage} #{index}"
    if isinstance(item, tuple):
        return " ".join(render_value(part, alt) for part in item)
    if isinstance(item, Mapping):
        return "<br>".join(
            f"{escape(str(key))}: {render_value(value, alt)}" for key, value in item.items()
        )
    return render_value(item, alt)
