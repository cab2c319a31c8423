"""Stage one's views rendered on the teacher's device (`teacher.render: device`): the loader workers only
decode, and the device crops, resizes and flips, for a teacher faster than the CPUs can render for.

A view's crop + antialiased bicubic resize is two matrix products, one per axis, with resampling weights built
from its pixel box; batched over all the views of a batch, a batch costs a handful of kernels however many
views it has. The weights are torch's antialiased bicubic ones (a = -0.5, PIL's), and the horizontal pass is
rounded to uint8 before the vertical one as torch's uint8 CPU kernel does, so the views match the workers'
`render_view` within 2 levels (tests/test_device_render.py).

The weights are dense over the batch's largest image: a view costs about 6 x H x W x size fp32 FLOPs, 0.4 GFLOP
for 500x375 images at 224 px, 20 GFLOP for 12-megapixel photos (on a GPU's fp32 units about the time of a bf16
ViT-L-14 forward; the workers' decode of such a photo grows with its pixels too).
"""

from __future__ import annotations

import torch

CUBIC_A = -0.5
PASS_ELEMENTS = 2**26  # floats one pass holds at once (256 MB, about): larger batches are rendered in parts


def cubic(x: torch.Tensor) -> torch.Tensor:
    """The bicubic convolution kernel (Keys, a = -0.5) at x."""
    x = x.abs()
    near = ((CUBIC_A + 2) * x - (CUBIC_A + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * CUBIC_A
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def resample_weights(start: torch.Tensor, length: torch.Tensor, full: int, size: int) -> torch.Tensor:
    """(M, size, full) weights that take pixels start..start+length-1 of an axis of `full` pixels to `size`
    antialiased bicubic samples, for M (start, length) pairs: torch's interpolate(antialias=True) weights."""
    start, length = start.float()[:, None, None], length.float()[:, None, None]
    scale = length / size
    stretch = scale.clamp(min=1)  # the kernel widens by the downscale factor (antialiasing), never narrows
    centre = scale * (torch.arange(size, device=start.device).float()[None, :, None] + 0.5)
    inside = torch.arange(full, device=start.device).float()[None, None, :] - start
    weights = cubic((inside + 0.5 - centre) / stretch) * ((inside >= 0) & (inside < length))
    return weights / weights.sum(-1, keepdim=True)


def render_views(sources: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 views (N, V, 3, size, size) of uint8 images (N, H, W, 3) (zero-padded to a common size), crops
    `boxes` (N, V, 4) in whole pixels (left, top, w, h) and horizontal `flips` (N, V), on their device."""
    n, views = boxes.shape[:2]
    height, width = sources.shape[1:3]
    # per image: its floats, its views' weights (with cubic()'s temporaries) and horizontal pass
    per_image = 3 * height * width + views * size * (6 * (height + width) + 3 * height)
    per_pass = max(1, PASS_ELEMENTS // per_image)
    return torch.cat([_render_part(sources[i: i + per_pass], boxes[i: i + per_pass], flips[i: i + per_pass], size)
                      for i in range(0, n, per_pass)]) if n else sources.new_empty((0, views, 3, size, size))


def _render_part(sources: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, size: int) -> torch.Tensor:
    n, views = boxes.shape[:2]
    height, width = sources.shape[1:3]
    flat = boxes.reshape(-1, 4).long()
    across = resample_weights(flat[:, 0], flat[:, 2], width, size).view(n, views, size, width)
    across = torch.where(flips.view(n, views, 1, 1), across.flip(2), across)
    down = resample_weights(flat[:, 1], flat[:, 3], height, size).view(n, views, size, height)
    rows = torch.einsum("nyxc,nvsx->nvcys", sources.float(), across).clamp_(0, 255).round_()
    return torch.einsum("nvty,nvcys->nvcts", down, rows).clamp_(0, 255).round_().to(torch.uint8)
