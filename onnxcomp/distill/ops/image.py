"""Image and spatial ops: Resize / Upsample in every mode, DepthToSpace / SpaceToDepth,
GridSample, AffineGrid, Col2Im, DeformConv, RoiAlign, NonMaxSuppression.

Resize follows the ONNX reference separably, axis by axis: the interpolation weights and
source indices depend only on shapes and scales, so they are computed once per call in numpy
and applied to the tensor with a gather and a weighted sum, which is differentiable in the
input (linear, cubic, antialiased) or a plain gather (nearest).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from onnxcomp.distill.ops._common import (
    Attrs,
    Inputs,
    OpFn,
    Tensor,
    axis_of,
    float_attr,
    ints,
    optional,
)

# -- Resize / Upsample ----------------------------------------------------------------------------


def _source_coordinates(
    mode: str, out: np.ndarray, scale: float, size: int, out_size: int,
    roi: tuple[float, float] | None,
) -> tuple[np.ndarray, np.ndarray | None]:  # fmt: skip
    """Input coordinate of each output index, and (tf_crop_and_resize) which fall outside."""
    exact = scale * size
    if mode == "align_corners":
        return (np.zeros_like(out) if exact == 1 else out * (size - 1) / (exact - 1)), None
    if mode == "asymmetric":
        return out / scale, None
    if mode == "tf_half_pixel_for_nn":
        return (out + 0.5) / scale, None
    if mode == "tf_crop_and_resize":
        start, end = roi if roi is not None else (0.0, 1.0)
        if exact == 1:
            x = np.full_like(out, (end - start) * (size - 1) / 2)
        else:
            x = out * (end - start) * (size - 1) / (exact - 1)
        x = x + start * (size - 1)
        return x, (x < 0) | (x > size - 1)
    if mode == "pytorch_half_pixel":
        return (np.full_like(out, -0.5) if exact == 1 else (out + 0.5) / scale - 0.5), None
    if mode == "half_pixel":
        return (out + 0.5) / scale - 0.5, None
    if mode == "half_pixel_symmetric":
        offset = size / 2 * (1 - out_size / exact)
        return offset + (out + 0.5) / scale - 0.5, None
    raise NotImplementedError(f"coordinate_transformation_mode {mode}")


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def _coefficients(ratio: np.ndarray, scale: float, attrs: Attrs, nearest: str) -> np.ndarray:
    """Weights of the neighbours of each output position ([outputs, neighbours])."""
    mode = attrs.get("mode", "nearest")
    r = ratio[:, None]
    if mode == "nearest":
        if nearest == "simple":  # ONNX Runtime before opset 11: floor up, ceil down
            right = np.full_like(r, scale < 1, dtype=bool)
        elif nearest == "round_prefer_floor":
            right = r > 0.5
        elif nearest == "round_prefer_ceil":
            right = r >= 0.5
        elif nearest == "floor":
            right = np.zeros_like(r, dtype=bool)
        else:
            right = np.ones_like(r, dtype=bool)
        right = right | (r == 1)  # an exact integer position is the right neighbour
        return np.concatenate([~right, right], axis=1).astype(np.float64)
    antialias = bool(attrs.get("antialias", 0))
    if mode == "linear":
        if not antialias:
            return np.concatenate([1 - r, r], axis=1)
        s = min(scale, 1.0)
        start = int(np.floor(-1 / s) + 1)
        args = (np.arange(start, 2 - start)[None, :] - r) * s
        weights = np.clip(1 - np.abs(args), 0, 1)
        return weights / weights.sum(axis=1, keepdims=True)
    a = float_attr(attrs, "cubic_coeff_a", -0.75)
    if not antialias:
        return _cubic(np.concatenate([r + 1, r, 1 - r, 2 - r], axis=1), a)
    s = min(scale, 1.0)
    start = int(np.floor(-2 / s) + 1)
    weights = _cubic(s * (np.arange(start, 2 - start)[None, :] - r), a)
    return weights / weights.sum(axis=1, keepdims=True)


def _resize_axis(
    x: Tensor, axis: int, scale: float, out_size: int, attrs: Attrs, coordinate: str,
    nearest: str, roi: tuple[float, float] | None,
) -> Tensor:  # fmt: skip
    size = x.shape[axis]
    out = np.arange(out_size, dtype=np.float64)
    source, outside = _source_coordinates(coordinate, out, scale, size, out_size, roi)
    floor = np.floor(source)
    ratio = np.where(source == floor, 1.0, source - floor)
    coeffs = _coefficients(ratio, scale, attrs, nearest)
    n = coeffs.shape[1]
    # The n indices nearest the source coordinate, ties to the smaller (the reference's rule).
    pad = math.ceil(n / 2)
    padded = source + pad
    base = np.floor(padded)
    frac = padded - base
    if n % 2 == 0:
        offset = np.where(frac == 0, -(n // 2), -(n // 2) + 1)
    else:
        offset = np.where(frac <= 0.5, -((n - 1) // 2), -((n - 1) // 2) + 1)
    neighbours = (base + offset).astype(np.int64)[:, None] + np.arange(n)[None, :] - pad
    if attrs.get("exclude_outside", 0):
        coeffs = np.where((neighbours < 0) | (neighbours >= size), 0.0, coeffs)
        total = coeffs.sum(axis=1, keepdims=True)
        coeffs = coeffs / np.where(total == 0, 1.0, total)
    neighbours = np.clip(neighbours, 0, size - 1)
    device = x.device
    if attrs.get("mode", "nearest") == "nearest":
        picked = neighbours[np.arange(out_size), coeffs.argmax(axis=1)]
        y = x.index_select(axis, torch.from_numpy(picked).to(device))
    else:
        gathered = x.index_select(axis, torch.from_numpy(neighbours.reshape(-1)).to(device))
        gathered = gathered.unflatten(axis, (out_size, n))
        view = [1] * gathered.dim()
        view[axis], view[axis + 1] = out_size, n
        weights = torch.from_numpy(coeffs).to(device=device, dtype=x.dtype).reshape(view)
        y = (gathered * weights).sum(dim=axis + 1)
    if outside is not None and outside.any():
        view = [1] * y.dim()
        view[axis] = out_size
        mask = torch.from_numpy(outside).to(device).reshape(view)
        fill = torch.tensor(float_attr(attrs, "extrapolation_value", 0.0), dtype=y.dtype)
        y = torch.where(mask, fill.to(device), y)
    return y


def _present(t: Tensor | None) -> Tensor | None:
    return t if t is not None and t.numel() > 0 else None


def _resize(inputs: Inputs, attrs: Attrs) -> Tensor:
    x = inputs[0]
    rank = x.dim()
    if attrs["_opset"] < 11:
        roi, scales, sizes = None, ints_or_floats(inputs[1]), None
        coordinate, nearest = "asymmetric", "simple"
    else:
        roi = _present(optional(inputs, 1))
        scales = ints_or_floats(_present(optional(inputs, 2)))
        sizes = ints(_present(optional(inputs, 3)))
        coordinate = attrs.get("coordinate_transformation_mode", "half_pixel")
        nearest = attrs.get("nearest_mode", "round_prefer_floor")
    return resize(x, rank, scales, sizes, roi, attrs, coordinate, nearest)


def ints_or_floats(t: Tensor | None) -> list[float] | None:
    return None if t is None else [float(v) for v in t.reshape(-1).tolist()]


def resize(
    x: Tensor, rank: int, scales: Sequence[float] | None, sizes: Sequence[int] | None,
    roi: Tensor | None, attrs: Attrs, coordinate: str, nearest: str,
) -> Tensor:  # fmt: skip
    """Resize ``x`` by ``scales`` or to ``sizes`` (over ``attrs['axes']`` or every axis)."""
    axes = [axis_of(a, rank) for a in attrs.get("axes") or range(rank)]
    shape = list(x.shape)
    factors = [1.0] * rank
    out = list(shape)
    box = [(0.0, 1.0)] * rank
    if roi is not None:
        values = [float(v) for v in roi.reshape(-1).tolist()]
        for i, axis in enumerate(axes):
            box[axis] = (values[i], values[len(axes) + i])
    if sizes is not None:
        for i, axis in enumerate(axes):
            out[axis] = sizes[i]
            factors[axis] = sizes[i] / shape[axis]
        policy = attrs.get("keep_aspect_ratio_policy", "stretch")
        if policy != "stretch":
            pick = min if policy == "not_larger" else max
            common = pick(factors[a] for a in axes)
            for axis in axes:
                factors[axis] = common
                out[axis] = int(common * shape[axis] + 0.5)
    else:
        for i, axis in enumerate(axes):
            factors[axis] = scales[i]
            out[axis] = int(scales[i] * shape[axis])
    dtype = x.dtype
    y = x if x.is_floating_point() else x.to(torch.float32)
    for axis in axes:
        identity = math.isclose(factors[axis], 1.0) and out[axis] == shape[axis]
        if identity and box[axis] == (0.0, 1.0):
            continue
        y = _resize_axis(y, axis, factors[axis], out[axis], attrs, coordinate, nearest,
                         box[axis] if roi is not None else None)  # fmt: skip
    if not dtype.is_floating_point:
        info = torch.iinfo(dtype)
        y = torch.clamp(torch.round(y), info.min, info.max)
    return y.to(dtype)


def _upsample(inputs: Inputs, attrs: Attrs) -> Tensor:
    x = inputs[0]
    scales = list(attrs["scales"]) if "scales" in attrs else ints_or_floats(inputs[1])
    mode = attrs.get("mode", "nearest")
    fixed = {"mode": "linear" if mode in ("linear", "bilinear") else "nearest"}
    return resize(x, x.dim(), scales, None, None, fixed, "asymmetric", "simple")


# -- rearrangements -------------------------------------------------------------------------------


def _depth_to_space(inputs: Inputs, attrs: Attrs) -> Tensor:
    x = inputs[0]
    n, c, h, w = x.shape
    b = attrs["blocksize"]
    if attrs.get("mode", "DCR") == "DCR":
        y = x.reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
    else:
        y = x.reshape(n, c // (b * b), b, b, h, w).permute(0, 1, 4, 2, 5, 3)
    return y.reshape(n, c // (b * b), h * b, w * b)


def _space_to_depth(inputs: Inputs, attrs: Attrs) -> Tensor:
    x = inputs[0]
    n, c, h, w = x.shape
    b = attrs["blocksize"]
    y = x.reshape(n, c, h // b, b, w // b, b)
    if attrs.get("mode", "DCR") == "DCR":
        y = y.permute(0, 3, 5, 1, 2, 4)
    else:
        y = y.permute(0, 1, 3, 5, 2, 4)
    return y.reshape(n, c * b * b, h // b, w // b)


def _col2im(inputs: Inputs, attrs: Attrs) -> Tensor:
    x, image, block = inputs[0], ints(inputs[1]), ints(inputs[2])
    nd = len(image)
    dilations = list(attrs.get("dilations") or [1] * nd)
    strides = list(attrs.get("strides") or [1] * nd)
    pads = list(attrs.get("pads") or [0] * (2 * nd))
    padded = [image[d] + pads[d] + pads[d + nd] for d in range(nd)]
    counts = [(padded[d] - dilations[d] * (block[d] - 1) - 1) // strides[d] + 1 for d in range(nd)]
    # Flat position in the padded image of each (kernel offset, block) pair, row-major.
    kernel = np.stack(np.meshgrid(*[np.arange(k) for k in block], indexing="ij"), -1)
    blocks = np.stack(np.meshgrid(*[np.arange(c) for c in counts], indexing="ij"), -1)
    kernel, blocks = kernel.reshape(-1, nd), blocks.reshape(-1, nd)
    position = blocks[None, :, :] * strides + kernel[:, None, :] * dilations
    flat = np.ravel_multi_index(tuple(position.reshape(-1, nd).T), padded)
    n, channels = x.shape[0], x.shape[1] // math.prod(block)
    out = x.new_zeros(n, channels, math.prod(padded))
    out = out.index_add(2, torch.from_numpy(flat).to(x.device), x.reshape(n, channels, -1))
    out = out.reshape(n, channels, *padded)
    for d in range(nd):
        out = out.narrow(2 + d, pads[d], image[d])
    return out


# -- sampling -------------------------------------------------------------------------------------

_GRID_MODES = {"linear": "bilinear", "bilinear": "bilinear", "nearest": "nearest",
               "cubic": "bicubic", "bicubic": "bicubic"}  # fmt: skip


def _grid_sample(inputs: Inputs, attrs: Attrs) -> Tensor:
    x, grid = inputs[0], inputs[1]
    return F.grid_sample(
        x,
        grid.to(x.dtype),
        mode=_GRID_MODES[attrs.get("mode", "linear" if attrs["_opset"] >= 20 else "bilinear")],
        padding_mode=attrs.get("padding_mode", "zeros"),
        align_corners=bool(attrs.get("align_corners", 0)),
    )


def _affine_grid(inputs: Inputs, attrs: Attrs) -> Tensor:
    theta, size = inputs[0], ints(inputs[1])
    return F.affine_grid(theta, size, align_corners=bool(attrs.get("align_corners", 0)))


def _deform_conv(inputs: Inputs, attrs: Attrs) -> Tensor:
    """Convolution sampling the input at offset positions (bilinear, zero outside), each tap
    scaled by its mask: the sampled columns times the weights, per group."""
    x, w, offset = inputs[0], inputs[1], inputs[2]
    bias, mask = optional(inputs, 3), optional(inputs, 4)
    n, channels, height, width = x.shape
    out_channels, _, kh, kw = w.shape
    taps = kh * kw
    strides = list(attrs.get("strides") or [1, 1])
    dilations = list(attrs.get("dilations") or [1, 1])
    pads = list(attrs.get("pads") or [0, 0, 0, 0])
    groups, offset_groups = attrs.get("group", 1), attrs.get("offset_group", 1)
    oh, ow = offset.shape[2], offset.shape[3]
    device, dtype = x.device, x.dtype
    rows = (torch.arange(oh, device=device) * strides[0] - pads[0]).to(dtype)
    cols = (torch.arange(ow, device=device) * strides[1] - pads[1]).to(dtype)
    ki = (torch.arange(kh, device=device) * dilations[0]).repeat_interleave(kw).to(dtype)
    kj = (torch.arange(kw, device=device) * dilations[1]).repeat(kh).to(dtype)
    base_y = ki.reshape(taps, 1, 1) + rows.reshape(1, oh, 1)  # [taps, oh, 1]
    base_x = kj.reshape(taps, 1, 1) + cols.reshape(1, 1, ow)  # [taps, 1, ow]
    offset = offset.reshape(n, offset_groups, taps, 2, oh, ow)
    sampled = []
    per_group = channels // offset_groups
    for g in range(offset_groups):
        y = base_y + offset[:, g, :, 0]  # [n, taps, oh, ow]
        xx = base_x + offset[:, g, :, 1]
        grid = torch.stack([2 * xx / max(width - 1, 1) - 1, 2 * y / max(height - 1, 1) - 1], -1)
        part = F.grid_sample(
            x[:, g * per_group : (g + 1) * per_group],
            grid.reshape(n, taps * oh, ow, 2),
            mode="bilinear",
            padding_mode="zeros",
            align_corners=True,
        ).reshape(n, per_group, taps, oh, ow)
        if mask is not None:
            part = part * mask.reshape(n, offset_groups, taps, oh, ow)[:, g : g + 1]
        sampled.append(part)
    columns = torch.cat(sampled, dim=1)  # [n, channels, taps, oh, ow]
    columns = columns.reshape(n, groups, channels // groups, taps, oh, ow)
    weights = w.reshape(groups, out_channels // groups, channels // groups, taps)
    y = torch.einsum("gock,ngckhw->ngohw", weights, columns).reshape(n, out_channels, oh, ow)
    return y + bias.reshape(1, -1, 1, 1) if bias is not None else y


def _roi_align(inputs: Inputs, attrs: Attrs) -> Tensor:
    """ONNX Runtime's RoiAlign: bilinear samples on a regular grid in each bin (adaptive
    count unless sampling_ratio), averaged or maxed; differentiable in the features."""
    x, rois, batch = inputs[0], inputs[1], inputs[2].long()
    height, width = x.shape[2], x.shape[3]
    oh, ow = attrs.get("output_height", 1), attrs.get("output_width", 1)
    ratio = attrs.get("sampling_ratio", 0)
    scale = float_attr(attrs, "spatial_scale", 1.0)
    half = attrs.get("coordinate_transformation_mode", "half_pixel" if attrs["_opset"] >= 16
                     else "output_half_pixel") == "half_pixel"  # fmt: skip
    use_max = attrs.get("mode", "avg") == "max"
    outputs = []
    for r in range(rois.shape[0]):
        x1, y1, x2, y2 = (float(v) * scale - (0.5 if half else 0.0) for v in rois[r].tolist())
        roi_w, roi_h = x2 - x1, y2 - y1
        if not half:
            roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
        gh = ratio if ratio > 0 else math.ceil(roi_h / oh)
        gw = ratio if ratio > 0 else math.ceil(roi_w / ow)
        ys = y1 + (np.arange(oh)[:, None] + (np.arange(gh)[None, :] + 0.5) / gh) * roi_h / oh
        xs = x1 + (np.arange(ow)[:, None] + (np.arange(gw)[None, :] + 0.5) / gw) * roi_w / ow
        ylo, yhi, ly, yok = _roi_axis(ys.reshape(-1), height)
        xlo, xhi, lx, xok = _roi_axis(xs.reshape(-1), width)
        ok = torch.from_numpy(np.outer(yok, xok)).to(x.device, x.dtype)
        ly_t = torch.from_numpy(ly).to(x.device, x.dtype).reshape(-1, 1)
        lx_t = torch.from_numpy(lx).to(x.device, x.dtype).reshape(1, -1)
        plane = x[int(batch[r])]

        def at(yi: np.ndarray, xi: np.ndarray, p: Tensor = plane) -> Tensor:
            return p[:, torch.from_numpy(yi)[:, None], torch.from_numpy(xi)[None, :]]

        terms = [
            (1 - ly_t) * (1 - lx_t) * ok * at(ylo, xlo),
            (1 - ly_t) * lx_t * ok * at(ylo, xhi),
            ly_t * (1 - lx_t) * ok * at(yhi, xlo),
            ly_t * lx_t * ok * at(yhi, xhi),
        ]
        shape = (plane.shape[0], oh, gh, ow, gw)
        if use_max:
            value = torch.stack(terms).amax(0).reshape(shape).amax(dim=(2, 4))
        else:
            value = sum(terms).reshape(shape).mean(dim=(2, 4))
        outputs.append(value)
    if not outputs:
        return x.new_zeros((0, x.shape[1], oh, ow))
    return torch.stack(outputs)


def _max_roi_pool(inputs: Inputs, attrs: Attrs) -> Tensor:
    """Fast R-CNN's RoI max pooling (rois: batch index, x1, y1, x2, y2; Caffe's rounding)."""
    x, rois = inputs[0], inputs[1]
    ph, pw = attrs["pooled_shape"]
    scale = float_attr(attrs, "spatial_scale", 1.0)
    height, width = x.shape[2], x.shape[3]

    def c_round(v: float) -> int:
        return int(math.copysign(math.floor(abs(v) + 0.5), v))

    outputs = []
    for roi in rois.tolist():
        plane = x[int(roi[0])]
        x1, y1, x2, y2 = (c_round(v * scale) for v in roi[1:])
        bin_h, bin_w = max(y2 - y1 + 1, 1) / ph, max(x2 - x1 + 1, 1) / pw
        cells = []
        for i in range(ph):
            top = min(max(math.floor(i * bin_h) + y1, 0), height)
            bottom = min(max(math.ceil((i + 1) * bin_h) + y1, 0), height)
            for j in range(pw):
                left = min(max(math.floor(j * bin_w) + x1, 0), width)
                right = min(max(math.ceil((j + 1) * bin_w) + x1, 0), width)
                if bottom <= top or right <= left:
                    cells.append(plane.new_zeros(plane.shape[0]))
                else:
                    cells.append(plane[:, top:bottom, left:right].amax(dim=(1, 2)))
        outputs.append(torch.stack(cells, dim=1).reshape(plane.shape[0], ph, pw))
    return torch.stack(outputs) if outputs else x.new_zeros((0, x.shape[1], ph, pw))


def _roi_axis(coords: np.ndarray, size: int) -> tuple[np.ndarray, ...]:
    """Low and high neighbours, the fraction towards the high one, and which samples count
    (ONNX Runtime's rules: beyond one pixel outside is zero, the border clamps)."""
    ok = (coords >= -1.0) & (coords <= size)
    coords = np.maximum(coords, 0.0)
    low = np.floor(coords).astype(np.int64)
    edge = low >= size - 1
    low = np.where(edge, size - 1, low)
    high = np.where(edge, size - 1, low + 1)
    frac = np.where(edge, 0.0, coords - low)
    return low, high, frac, ok.astype(np.float64)


# -- detection ------------------------------------------------------------------------------------


def _corners(boxes: Tensor, centred: bool) -> Tensor:
    if centred:
        xc, yc, w, h = boxes.unbind(-1)
        return torch.stack([yc - h / 2, xc - w / 2, yc + h / 2, xc + w / 2], dim=-1)
    y1, x1, y2, x2 = boxes.unbind(-1)
    return torch.stack([torch.minimum(y1, y2), torch.minimum(x1, x2),
                        torch.maximum(y1, y2), torch.maximum(x1, x2)], dim=-1)  # fmt: skip


def _iou(box: Tensor, others: Tensor) -> Tensor:
    top = torch.maximum(box[0], others[:, 0])
    left = torch.maximum(box[1], others[:, 1])
    bottom = torch.minimum(box[2], others[:, 2])
    right = torch.minimum(box[3], others[:, 3])
    inter = (bottom - top).clamp(min=0) * (right - left).clamp(min=0)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    union = area + areas - inter
    return torch.where(union > 0, inter / union, torch.zeros_like(union))


def _non_max_suppression(inputs: Inputs, attrs: Attrs) -> Tensor:
    boxes, scores = inputs[0].detach(), inputs[1].detach()
    limit = optional(inputs, 2)
    limit = int(limit.item()) if limit is not None and limit.numel() else 0
    iou_limit = optional(inputs, 3)
    iou_limit = float(iou_limit.item()) if iou_limit is not None and iou_limit.numel() else 0.0
    floor = optional(inputs, 4)
    floor = float(floor.item()) if floor is not None and floor.numel() else None
    corners = _corners(boxes, bool(attrs.get("center_point_box", 0)))
    selected: list[tuple[int, int, int]] = []
    for b in range(scores.shape[0]):
        for c in range(scores.shape[1]):
            s = scores[b, c]
            candidates = torch.argsort(s, descending=True, stable=True)
            if floor is not None:
                candidates = candidates[s[candidates] > floor]
            kept: list[int] = []
            for index in candidates.tolist():
                if len(kept) >= limit:
                    break
                if kept and bool((_iou(corners[b, index], corners[b, kept]) > iou_limit).any()):
                    continue
                kept.append(index)
            selected += [(b, c, i) for i in kept]
    return torch.tensor(selected, dtype=torch.int64, device=boxes.device).reshape(-1, 3)


OPS: dict[str, OpFn] = {
    "Resize": _resize,
    "Upsample": _upsample,
    "DepthToSpace": _depth_to_space,
    "SpaceToDepth": _space_to_depth,
    "Col2Im": _col2im,
    "GridSample": _grid_sample,
    "AffineGrid": _affine_grid,
    "NonMaxSuppression": _non_max_suppression,
    "DeformConv": _deform_conv,
    "RoiAlign": _roi_align,
    "MaxRoiPool": _max_roi_pool,
}
