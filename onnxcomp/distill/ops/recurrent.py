"""Recurrent ops: LSTM, GRU and RNN with every ONNX option (directions, ``layout``,
``sequence_lens``, initial states, peepholes, ``clip``, ``input_forget``,
``linear_before_reset``, custom activations), unrolled step by step in torch.

The input projection of every step is one matmul up front; each step then does the
recurrent matmul. Steps past a sequence's length keep its state and output zeros, and the
reverse direction reverses each sequence within its own length, as ONNX says. Weights (W, R,
B, P) are ordinary tensors, so they train.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from onnxcomp.distill.ops._common import Attrs, Inputs, OpFn, Tensor, optional

Activation = Callable[[Tensor], Tensor]
# name -> (takes alpha, takes beta, default alpha, default beta)
_PARAMS = {
    "Affine": (True, True, 1.0, 0.0),
    "LeakyRelu": (True, False, 0.01, 0.0),
    "ThresholdedRelu": (True, False, 1.0, 0.0),
    "ScaledTanh": (True, True, 1.0, 1.0),
    "HardSigmoid": (True, True, 0.2, 0.5),
    "Elu": (True, False, 1.0, 0.0),
}


def _activation(name: str, alpha: float, beta: float) -> Activation:
    key = {n.lower(): n for n in (*_PARAMS, "Relu", "Tanh", "Sigmoid", "Softsign", "Softplus")}
    name = key.get(name.lower(), name)
    table: dict[str, Activation] = {
        "Relu": F.relu,
        "Tanh": torch.tanh,
        "Sigmoid": torch.sigmoid,
        "Softsign": F.softsign,
        "Softplus": F.softplus,
        "Affine": lambda x: alpha * x + beta,
        "LeakyRelu": lambda x: F.leaky_relu(x, alpha),
        "ThresholdedRelu": lambda x: torch.where(x > alpha, x, torch.zeros_like(x)),
        "ScaledTanh": lambda x: alpha * torch.tanh(beta * x),
        "HardSigmoid": lambda x: torch.clamp(alpha * x + beta, 0.0, 1.0),
        "Elu": lambda x: F.elu(x, alpha),
    }
    if name not in table:
        raise NotImplementedError(f"activation {name}")
    return table[name]


def _activations(attrs: Attrs, defaults: Sequence[str], directions: int) -> list[list[Activation]]:
    """Per direction, the cell's activation functions; alphas and betas are consumed in order
    by the functions that take them."""
    names = list(attrs.get("activations") or []) or list(defaults) * directions
    if len(names) == len(defaults) and directions == 2:
        names = names * 2
    alphas = list(attrs.get("activation_alpha") or [])
    betas = list(attrs.get("activation_beta") or [])
    made = []
    for name in names:
        takes_alpha, takes_beta, alpha, beta = _PARAMS.get(name, (False, False, 0.0, 0.0))
        if takes_alpha and alphas:
            alpha = alphas.pop(0)
        if takes_beta and betas:
            beta = betas.pop(0)
        made.append(_activation(name, alpha, beta))
    per = len(defaults)
    return [made[d * per : (d + 1) * per] for d in range(directions)]


def _reverse_within(x: Tensor, lengths: Tensor | None) -> Tensor:
    """Reverse [time, batch, ...] along time, each sequence within its own length."""
    if lengths is None:
        return x.flip(0)
    steps = torch.arange(x.shape[0], device=x.device).reshape(-1, 1)
    lengths = lengths.reshape(1, -1)
    source = torch.where(steps < lengths, lengths - 1 - steps, steps)
    index = source.reshape(*source.shape, *([1] * (x.dim() - 2))).expand(x.shape)
    return torch.gather(x, 0, index)


Cell = Callable[[Tensor, list[Tensor], int], list[Tensor]]


def _run(
    inputs: Inputs, attrs: Attrs, gates: int, states: int, defaults: Sequence[str],
    make_cell: Callable[[int, list[Activation]], Cell],
) -> tuple[Tensor, ...]:  # fmt: skip
    """Shared unrolling: inputs, layouts, directions, lengths, outputs."""
    x, w = inputs[0], inputs[1]
    lengths = optional(inputs, 4)
    initial = [optional(inputs, 5 + k) for k in range(states)]
    batch_first = bool(attrs.get("layout", 0))
    if batch_first:
        x = x.transpose(0, 1)
        initial = [None if s is None else s.transpose(0, 1) for s in initial]
    steps, batch = x.shape[0], x.shape[1]
    directions = w.shape[0]
    hidden = attrs.get("hidden_size") or inputs[2].shape[-1]
    if lengths is not None:
        lengths = lengths.long()
        if bool((lengths >= steps).all()):
            lengths = None  # every sequence is full: no masking needed
    activations = _activations(attrs, defaults, directions)
    reverse_only = attrs.get("direction", "forward") == "reverse"
    outputs, finals = [], [[] for _ in range(states)]
    for d in range(directions):
        cell = make_cell(d, activations[d])
        reverse = reverse_only or d == 1
        sequence = _reverse_within(x, lengths) if reverse else x
        bias = optional(inputs, 3)
        projected = sequence @ w[d].T
        if bias is not None:
            projected = projected + bias[d, : gates * hidden]
        state = [s[d] if s is not None else x.new_zeros(batch, hidden) for s in initial]
        ys = []
        for t in range(steps):
            new = cell(projected[t], state, t)
            if lengths is not None:
                live = (t < lengths).reshape(-1, 1)
                new = [torch.where(live, n, s) for n, s in zip(new, state, strict=True)]
                ys.append(torch.where(live, new[0], torch.zeros_like(new[0])))
            else:
                ys.append(new[0])
            state = new
        y = torch.stack(ys) if ys else x.new_zeros(0, batch, hidden)
        outputs.append(_reverse_within(y, lengths) if reverse else y)
        for k in range(states):
            finals[k].append(state[k])
    y = torch.stack(outputs, dim=1)  # [time, directions, batch, hidden]
    last = [torch.stack(f) for f in finals]  # [directions, batch, hidden]
    if batch_first:
        y = y.permute(2, 0, 1, 3)
        last = [s.transpose(0, 1) for s in last]
    return (y, *last)[: attrs["_outputs"]]


def _clipper(attrs: Attrs) -> Activation:
    clip = attrs.get("clip")
    if clip is None:
        return lambda v: v
    return lambda v: torch.clamp(v, -clip, clip)


def _lstm(inputs: Inputs, attrs: Attrs) -> tuple[Tensor, ...]:
    r, b, peep = inputs[2], optional(inputs, 3), optional(inputs, 7)
    hidden = r.shape[-1]
    clip = _clipper(attrs)
    couple = bool(attrs.get("input_forget", 0))

    def make(d: int, acts: list[Activation]) -> Cell:
        f, g, h = acts
        rt = r[d].T
        rb = b[d, 4 * hidden :] if b is not None else None
        p = peep[d].chunk(3) if peep is not None else None

        def cell(xp: Tensor, state: list[Tensor], t: int) -> list[Tensor]:
            h_prev, c_prev = state
            z = xp + h_prev @ rt
            if rb is not None:
                z = z + rb
            i, o, fg, c = z.chunk(4, dim=-1)
            if p is not None:
                i, fg = i + p[0] * c_prev, fg + p[2] * c_prev
            i = f(clip(i))
            fg = 1 - i if couple else f(clip(fg))
            c_new = fg * c_prev + i * g(clip(c))
            if p is not None:
                o = o + p[1] * c_new
            o = f(clip(o))
            return [o * h(c_new), c_new]

        return cell

    return _run(inputs, attrs, 4, 2, ("Sigmoid", "Tanh", "Tanh"), make)


def _gru(inputs: Inputs, attrs: Attrs) -> tuple[Tensor, ...]:
    r, b = inputs[2], optional(inputs, 3)
    hidden = r.shape[-1]
    clip = _clipper(attrs)
    before_reset = bool(attrs.get("linear_before_reset", 0))

    def make(d: int, acts: list[Activation]) -> Cell:
        f, g = acts
        rzr = r[d, : 2 * hidden].T
        rh = r[d, 2 * hidden :].T
        rb = b[d, 3 * hidden :] if b is not None else None

        def cell(xp: Tensor, state: list[Tensor], t: int) -> list[Tensor]:
            (h_prev,) = state
            xzr, xh = xp[..., : 2 * hidden], xp[..., 2 * hidden :]
            zr = xzr + h_prev @ rzr
            if rb is not None:
                zr = zr + rb[: 2 * hidden]
            z, reset = f(clip(zr)).chunk(2, dim=-1)
            rbh = rb[2 * hidden :] if rb is not None else 0.0
            if before_reset:
                candidate = xh + reset * (h_prev @ rh + rbh)
            else:
                candidate = xh + (reset * h_prev) @ rh + rbh
            hh = g(clip(candidate))
            return [(1 - z) * hh + z * h_prev]

        return cell

    return _run(inputs, attrs, 3, 1, ("Sigmoid", "Tanh"), make)


def _rnn(inputs: Inputs, attrs: Attrs) -> tuple[Tensor, ...]:
    r, b = inputs[2], optional(inputs, 3)
    hidden = r.shape[-1]
    clip = _clipper(attrs)

    def make(d: int, acts: list[Activation]) -> Cell:
        (f,) = acts
        rt = r[d].T
        rb = b[d, hidden:] if b is not None else None

        def cell(xp: Tensor, state: list[Tensor], t: int) -> list[Tensor]:
            z = xp + state[0] @ rt
            if rb is not None:
                z = z + rb
            return [f(clip(z))]

        return cell

    return _run(inputs, attrs, 1, 1, ("Tanh",), make)


OPS: dict[str, OpFn] = {"LSTM": _lstm, "GRU": _gru, "RNN": _rnn}
