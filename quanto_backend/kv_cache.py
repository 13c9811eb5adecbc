"""QuantizedCache: a transformers key/value cache stored as 2/4/8-bit codes (or float8), on quanto_backend's ops.

Each layer keeps the most recent tokens in full precision (the *residual*, at most ``residual_length`` of them, as
in KIVI) and everything older as quantized blocks. A block is quantized once, when the residual fills, and is
appended to the store: unlike transformers' ``QuantizedLayer``, already quantized tokens are never dequantized and
quantized again, so their error does not compound over a long generation, and a flush costs one block instead of
the whole history.

Layout of the stored codes, for states ``[batch, kv_heads, seq, head_dim]``:

* ``axis=0`` (per token): each token's ``head_dim`` values are split into groups of ``q_group_size``; codes are
  ``[batch, heads, seq, head_dim * bits / 8]``, scale and offset ``[batch, heads, seq, head_dim / q_group_size]``.
* ``axis=-1`` (per channel, KIVI's choice for keys): each channel is grouped over ``q_group_size`` consecutive
  tokens; codes are ``[batch, heads, head_dim, seq * bits / 8]``, scale and offset
  ``[batch, heads, head_dim, seq / q_group_size]``; tokens are flushed in whole groups (the rest stays residual).

2/4-bit codes are packed in *planar* order within each group: with ``n = q_group_size * bits / 8`` bytes per
group, bits ``[i * bits, (i + 1) * bits)`` of the group's byte ``j`` hold its value ``i * n + j`` (not the
interleaved order of :func:`quanto_backend.ops.reference.pack`), so that dequantization writes contiguous runs.

Integer codes are affine per group, ``x ~= (q - shift) * scale`` (the convention of
:mod:`quanto_backend.ops.reference`; ``scale``/``shift`` from min-max, refined by HQQ by default); float8 codes
are symmetric, ``x ~= q * scale``. Groups never span batch rows, so beam-search reordering selects rows of the
codes exactly, with no round trip through floats.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer, get_layer_types_and_kwargs

from . import ops
from .ops.float8 import FLOAT8_VIA_HALF_FACTOR, float8_into
from .qtypes import QType, qint2, qint4, quint8
from .tensor import AffineOptimizer, HqqOptimizer, MinMaxOptimizer

__all__ = ["QuantizedCache", "QuantizedLayer"]

# The integer formats: 8-bit codes use the unsigned 0..255 range of the affine mapping, like the packed ones.
_INT_QTYPES: dict[int, QType] = {8: quint8, 4: qint4, 2: qint2}
_FLOAT8_DTYPE = torch.float8_e4m3fn
_AXES = (0, -1)
# Integer scales and shifts: min-max, or refined by HQQ's least-squares steps (what a flush costs is paid once per
# residual_length tokens; on the tiny Llama of tests/test_kv_cache.py it cuts the int4 logits error 0.041 -> 0.036).
_OPTIMIZERS = {"hqq": HqqOptimizer, "minmax": MinMaxOptimizer}


def _check_layer_args(
    nbits: int, float8: bool, axis_key: int, axis_value: int, q_group_size, residual_length, optimizer: str
) -> None:
    if optimizer not in _OPTIMIZERS:
        raise ValueError(f"Unsupported optimizer {optimizer!r} for the quantized KV cache; accepted: hqq, minmax")
    if float8:
        if nbits != 8:
            raise ValueError(f"float8 KV codes are 8 bits wide: nbits must be 8 with float8=True, got {nbits!r}")
    elif nbits not in _INT_QTYPES:
        raise ValueError(f"Unsupported nbits {nbits!r} for the quantized KV cache; accepted: 8, 4, 2")
    for name, axis in (("axis_key", axis_key), ("axis_value", axis_value)):
        if axis not in _AXES:
            raise ValueError(f"Unsupported {name} {axis!r}; accepted: 0 (per token) or -1 (per channel)")
    if isinstance(q_group_size, bool) or not isinstance(q_group_size, int) or q_group_size <= 0:
        raise ValueError(f"q_group_size must be a positive integer, got {q_group_size!r}")
    if q_group_size * nbits % 8:
        raise ValueError(f"q_group_size * nbits must fill whole bytes, got q_group_size={q_group_size}, nbits={nbits}")
    if isinstance(residual_length, bool) or not isinstance(residual_length, int) or residual_length < 0:
        raise ValueError(f"residual_length must be a non-negative integer, got {residual_length!r}")
    if -1 in (axis_key, axis_value) and residual_length < q_group_size:
        raise ValueError(
            f"Per-channel quantization (axis -1) groups {q_group_size} tokens: residual_length ({residual_length}) "
            "must be at least q_group_size"
        )


class _QuantizedStates:
    """The quantized part of one layer's keys or values, grown one block at a time.

    ``codes`` (packed along the grouped dimension), ``scale`` and, for integer codes, ``offset = -shift * scale``:
    the affine mapping ``(q - shift) * scale`` is kept as ``q * scale + offset``, which dequantizes in one fused
    pass (``addcmul``) straight into the buffer handed to attention.
    """

    def __init__(self, qtype: QType | None, axis: int, group_size: int, optimizer: AffineOptimizer):
        self.qtype = qtype  # None: float8
        self.optimizer = optimizer
        self.axis = axis
        self.group_size = group_size
        self.codes: torch.Tensor | None = None
        self.scale: torch.Tensor | None = None
        self.offset: torch.Tensor | None = None
        self.length = 0

    _NAMES = ("codes", "scale", "offset")

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (getattr(self, name) for name in self._NAMES) if t is not None]

    def map(self, fn) -> None:
        """Replace each stored tensor ``t`` by ``fn(t)`` (reordering, repeating, moving)."""
        for name in self._NAMES:
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t))

    def append(self, states: torch.Tensor) -> None:
        """Quantize ``states`` ``[b, h, n, d]`` (``n`` a multiple of the group for axis -1) and append them."""
        rows = states.detach() if self.axis == 0 else states.detach().transpose(-1, -2)  # groups: last dimension
        groups = rows.unflatten(-1, (-1, self.group_size))
        if self.qtype is None:
            absmax = groups.abs().amax(dim=-1).float()
            scale = torch.where(absmax > 0, absmax / torch.finfo(_FLOAT8_DTYPE).max, torch.ones_like(absmax))
            scale = scale.to(states.dtype)
            codes = ops.quantize_symmetric(groups, scale.unsqueeze(-1), _FLOAT8_DTYPE).flatten(-2)
            offset = None
        else:
            scale, shift = self.optimizer(groups, self.qtype)
            scale, shift = scale.to(states.dtype), shift.to(states.dtype)
            bits = self.qtype.bits
            if bits < 8:
                # Planar order within each group (see the module docstring): ops.quantize_affine packs values
                # j * per_byte + i into byte j, so it is given value i * n_bytes + j there.
                per_byte = 8 // bits
                rows = groups.unflatten(-1, (per_byte, -1)).transpose(-1, -2).flatten(-3)
            # As 2-D rows, the shape the CUDA kernels take.
            flat = ops.quantize_affine(
                rows.reshape(-1, rows.shape[-1]), scale.flatten(0, -2), shift.flatten(0, -2), bits
            )
            codes = flat.reshape(*rows.shape[:-1], -1)
            offset = (-shift.float() * scale.float()).to(states.dtype)
        dim = 2 if self.axis == 0 else 3  # the sequence dimension of the stored codes and scales
        self.codes = codes if self.codes is None else torch.cat([self.codes, codes], dim=dim)
        self.scale = scale if self.scale is None else torch.cat([self.scale, scale], dim=dim)
        if offset is not None:
            self.offset = offset if self.offset is None else torch.cat([self.offset, offset], dim=dim)
        self.length += states.shape[-2]

    def dequantize_into(self, out: torch.Tensor) -> None:
        """Write the states into ``out`` ``[b, h, length, d]`` (a view of the buffer returned to attention).

        The codes are first written into ``out`` as values (one conversion pass), then scaled and offset in place,
        every pass with a single dtype: on CPU an elementwise op over mixed dtypes (uint8 codes times float
        scales, as ``addcmul`` would take them) falls off the vectorised path and costs several times more.
        """
        rows = out if self.axis == 0 else out.transpose(-1, -2)
        groups = rows.unflatten(-1, (-1, self.group_size))
        scale = self.scale.unsqueeze(-1)
        if self.qtype is None:
            float8_into(self.codes, rows)
            groups.mul_(scale * FLOAT8_VIA_HALF_FACTOR[_FLOAT8_DTYPE])
            return
        offset = self.offset.unsqueeze(-1)
        bits = self.qtype.bits
        if bits == 8:  # 8-bit codes are stored as they are (packing them is the identity)
            codes = self.codes.unflatten(-1, (-1, self.group_size))
            if out.dtype != torch.float32:
                # codes up to 255 times the scale, rounded to bf16/f16 before the offset is added, would lose up to
                # half a code step: one fused op rounds once
                torch.addcmul(offset, codes, scale, out=groups)
                return
            groups.copy_(codes)
        else:
            # Planar packed codes: bit position i of a group's byte j holds value i * n_bytes + j, so each position
            # is shifted out and converted into a contiguous run of n_bytes values (the interleaved layout of
            # ops.reference.pack would make every write strided: 1.7x slower at 4 bits, 1.5x at 2).
            per_byte, mask = 8 // bits, (1 << bits) - 1
            planes = groups.unflatten(-1, (per_byte, -1))
            packed = self.codes.unflatten(-1, (-1, self.group_size // per_byte))
            for i in range(per_byte):
                codes = packed if i == 0 else packed >> (bits * i)
                planes[..., i, :].copy_(codes & mask if i < per_byte - 1 else codes)
        groups.mul_(scale).add_(offset)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The states ``[b, h, length, d]`` in ``dtype``."""
        b, h = self.codes.shape[:2]
        d = self.codes.shape[2] if self.axis == -1 else self.scale.shape[-1] * self.group_size
        out = torch.empty(b, h, self.length, d, dtype=dtype, device=self.codes.device)
        self.dequantize_into(out)
        return out


class QuantizedLayer(DynamicLayer):
    """One layer of :class:`QuantizedCache`: a full-precision residual of recent tokens over quantized blocks.

    ``self.keys``/``self.values`` hold the residual (as in ``DynamicLayer``); the quantized blocks are in
    ``quantized_keys``/``quantized_values``.
    """

    is_croppable = False

    def __init__(
        self,
        nbits: int = 4,
        axis_key: int = 0,
        axis_value: int = 0,
        q_group_size: int = 64,
        residual_length: int = 128,
        float8: bool = False,
        optimizer: str = "hqq",
    ):
        super().__init__()
        _check_layer_args(nbits, float8, axis_key, axis_value, q_group_size, residual_length, optimizer)
        self.nbits = nbits
        self.float8 = float8
        self.axis_key, self.axis_value = axis_key, axis_value
        self.q_group_size = q_group_size
        self.residual_length = residual_length
        self._qtype = None if float8 else _INT_QTYPES[nbits]
        self._optimizer = _OPTIMIZERS[optimizer]()
        self._new_states()
        # Per-channel groups span tokens: a flush moves a whole number of groups, the remainder stays residual.
        self._flush_multiple = q_group_size if -1 in (axis_key, axis_value) else 1

    def _new_states(self) -> None:
        self.quantized_keys = _QuantizedStates(self._qtype, self.axis_key, self.q_group_size, self._optimizer)
        self.quantized_values = _QuantizedStates(self._qtype, self.axis_value, self.q_group_size, self._optimizer)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        head_dim = key_states.shape[-1]
        if head_dim % self.q_group_size or value_states.shape[-1] % self.q_group_size:
            raise ValueError(
                f"q_group_size ({self.q_group_size}) must divide head_dim (keys {head_dim}, values "
                f"{value_states.shape[-1]})"
            )
        super().lazy_initialization(key_states, value_states)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new states; return all the layer's keys and values (older ones dequantized)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        all_keys = self._with_quantized(self.quantized_keys, keys)
        all_values = self._with_quantized(self.quantized_values, values)
        # The current step attends to its own new states in full precision; they are quantized after it.
        if keys.shape[-2] >= max(self.residual_length, 1):
            n = keys.shape[-2] // self._flush_multiple * self._flush_multiple
            self.quantized_keys.append(keys[..., :n, :])
            self.quantized_values.append(values[..., :n, :])
            keys, values = keys[..., n:, :], values[..., n:, :]
        self.keys, self.values = keys, values
        return all_keys, all_values

    @staticmethod
    def _with_quantized(quantized: _QuantizedStates, residual: torch.Tensor) -> torch.Tensor:
        """The dequantized states followed by the residual, written once into one new buffer (no second copy)."""
        if not quantized.length:
            return residual
        b, h, n, d = residual.shape
        out = torch.empty(b, h, quantized.length + n, d, dtype=residual.dtype, device=residual.device)
        quantized.dequantize_into(out[:, :, : quantized.length])
        out[:, :, quantized.length :] = residual
        return out

    def get_seq_length(self) -> int:
        if not self.is_initialized:
            return 0
        return self.quantized_keys.length + self.keys.shape[-2]

    @property
    def nbytes(self) -> int:
        """Bytes held: codes, scales, offsets and the full-precision residual."""
        if not self.is_initialized:
            return 0
        stored = self.quantized_keys.tensors() + self.quantized_values.tensors() + [self.keys, self.values]
        return sum(t.numel() * t.element_size() for t in stored)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        if indices.dtype == torch.bool:
            indices = indices.nonzero().flatten()
        indices = torch.as_tensor(indices, device=self.keys.device)
        self.keys = self.keys.index_select(0, indices)
        self.values = self.values.index_select(0, indices)
        # Exact: groups never span batch rows, so selecting rows of the codes selects rows of the states.
        for states in (self.quantized_keys, self.quantized_values):
            states.map(lambda t: t.index_select(0, indices.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if not self.is_initialized:
            return
        self.keys = self.keys.repeat_interleave(repeats, dim=0)
        self.values = self.values.repeat_interleave(repeats, dim=0)
        for states in (self.quantized_keys, self.quantized_values):
            states.map(lambda t: t.repeat_interleave(repeats, dim=0))

    def offload(self):
        super().offload()
        for states in (self.quantized_keys, self.quantized_values):
            states.map(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self):
        super().prefetch()
        if self.is_initialized:
            for states in (self.quantized_keys, self.quantized_values):
                states.map(lambda t: t.to(self.device, non_blocking=True))

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "QuantizedCache cannot be cropped: quantized tokens cannot be removed exactly (use DynamicCache for "
            "assisted generation)"
        )

    def reset(self) -> None:
        super().reset()
        self._new_states()


class QuantizedCache(Cache):
    """A key/value cache for ``generate(past_key_values=...)`` and ``forward`` (``cache=`` from transformers 5.25)
    that stores older tokens quantized.

    Args:
        config: the model's config (``PreTrainedConfig``); every decoder layer must be full attention.
        nbits: 8, 4 or 2 bits per stored value.
        q_group_size: values per group sharing a scale (and shift); must divide ``head_dim``.
        residual_length: the most recent tokens kept in full precision; when the residual holds this many, they
            are quantized (0: quantize every step's states right after the step uses them).
        axis_key, axis_value: 0 groups along ``head_dim`` for each token; -1 groups each channel over
            ``q_group_size`` consecutive tokens (needs ``residual_length >= q_group_size``).
        float8: store float8 (e4m3) codes with a symmetric scale per group instead of integer codes (nbits 8).
        optimizer: how integer scales and shifts are chosen when a block is quantized: ``"hqq"`` (min-max refined
            by HQQ, lower error) or ``"minmax"`` (cheaper flushes).

    Example::

        cache = QuantizedCache(model.config, nbits=4, q_group_size=64, residual_length=128)
        out = model.generate(input_ids, past_key_values=cache, max_new_tokens=64)
    """

    def __init__(
        self,
        config,
        nbits: int = 4,
        q_group_size: int = 64,
        residual_length: int = 128,
        axis_key: int = 0,
        axis_value: int = 0,
        float8: bool = False,
        optimizer: str = "hqq",
    ):
        _check_layer_args(nbits, float8, axis_key, axis_value, q_group_size, residual_length, optimizer)
        config = config.get_text_config(decoder=True)
        layer_types, _ = get_layer_types_and_kwargs(config)
        others = sorted(set(layer_types) - {"full_attention"})
        if others:
            raise ValueError(f"QuantizedCache supports full-attention layers only; this model also has {others}")
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        if head_dim % q_group_size:
            raise ValueError(f"q_group_size ({q_group_size}) must divide the model's head_dim ({head_dim})")
        layers = [
            QuantizedLayer(nbits, axis_key, axis_value, q_group_size, residual_length, float8, optimizer)
            for _ in range(config.num_hidden_layers)
        ]
        super().__init__(layers=layers)

    @property
    def nbytes(self) -> int:
        """Bytes held by all layers (codes, scales, offsets and full-precision residuals)."""
        return sum(layer.nbytes for layer in self.layers)
