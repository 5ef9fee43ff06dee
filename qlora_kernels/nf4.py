"""``NF4Weight``: a frozen weight in bitsandbytes' NF4 storage format, created here or viewed from bitsandbytes."""

from __future__ import annotations

import json
from typing import Any, Mapping, Optional

import torch

from . import ops, reference
from .storage import check_blocksize, check_nf4_storage, check_shape  # noqa: F401 (check_blocksize: public here)

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_QUANT_STATE_KEY = "quant_state.bitsandbytes__nf4"
_FP4_STATE_KEY = "quant_state.bitsandbytes__fp4"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: str, what: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{what} must name a torch dtype, got {name!r}")
    return dtype


def _state_tensor(state_dict: Mapping[str, Any], key: str) -> torch.Tensor:
    value = state_dict[key]
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"state_dict[{key!r}] must be a torch.Tensor, got {type(value).__name__}")
    return value


def _read_quant_state(blob: Any, key: str) -> dict:
    """bitsandbytes' packed quant state: a uint8 tensor of UTF-8 JSON holding one object."""
    if not isinstance(blob, torch.Tensor) or blob.dtype != torch.uint8 or blob.dim() != 1:
        raise ValueError(f"{key} must be a 1-D uint8 tensor of JSON bytes, got {getattr(blob, 'dtype', type(blob).__name__)}")
    if blob.numel() > 1 << 20:
        raise ValueError(f"{key} holds {blob.numel()} bytes; a quant state is a few hundred")
    try:
        meta = json.loads(bytes(blob.cpu().tolist()).decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{key} is not bitsandbytes' packed JSON quant state: {exc}") from exc
    if not isinstance(meta, dict):
        raise ValueError(f"{key} must hold a JSON object, got a JSON {type(meta).__name__}")
    if meta.get("quant_type") != "nf4":
        raise ValueError(f"{key} has quant_type {meta.get('quant_type')!r}, expected 'nf4'")
    for field in ("blocksize", "dtype", "shape"):
        if field not in meta:
            raise ValueError(f"{key} lacks {field!r}")
    return meta


def _meta_int(meta: Mapping[str, Any], field: str, key: str, default: Optional[int] = None) -> int:
    value = meta.get(field, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key}[{field!r}] must be an integer, got {type(value).__name__} {value!r}")
    return value


def _format_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def in_bnb_cpu_layout(quant_state: Any) -> bool:
    """True when bitsandbytes has rewritten the storage behind ``quant_state`` into its CPU inference layout
    (reordered bytes, bf16 absmax), which is not NF4 storage. bitsandbytes does so, in place, at an eval-mode forward
    whose input needs no grad on a CPU with AVX512-BF16."""
    return bool(getattr(quant_state, "packing_format_for_cpu", False))


def _plain(t: Any) -> Any:
    """A plain ``torch.Tensor`` sharing storage with ``t`` (drops Parameter / Params4bit subclasses); anything that
    is not a tensor is returned as it is, for the storage check to name."""
    if isinstance(t, torch.Tensor) and type(t) is not torch.Tensor:
        return t.detach().as_subclass(torch.Tensor)
    return t


class NF4Weight:
    """A frozen [N, K] weight stored as NF4 exactly as bitsandbytes stores it.

    Storage (bitsandbytes' layout): ``packed`` holds (N·K + 1) // 2 bytes, two 4-bit codes per byte with the first
    element in the high nibble, shaped [bytes / itemsize, 1] in ``quant_storage`` (uint8 by default; bf16/fp16/fp32
    reinterpret the same bytes). ``absmax`` has one entry per block of ``blocksize`` elements of the row-major
    flattened weight: float32, or uint8 codes of the signed 8-bit dynamic map when double-quantized, in which case
    ``nested_absmax`` (float32 per 256 blocks) and ``offset`` (float32 scalar) complete it.

    Create with :meth:`quantize`, :meth:`from_bnb` (zero-copy) or :meth:`from_state_dict`. The object is frozen: it
    has no gradient and is not an ``nn.Parameter``.
    """

    def __init__(
        self,
        packed: torch.Tensor,
        absmax: torch.Tensor,
        shape: tuple[int, int] | torch.Size,
        dtype: torch.dtype,
        blocksize: int = 64,
        nested_absmax: Optional[torch.Tensor] = None,
        offset: Optional[torch.Tensor] = None,
        quant_map: Optional[torch.Tensor] = None,
        nested_quant_map: Optional[torch.Tensor] = None,
    ) -> None:
        n, k = check_shape(shape)
        if not isinstance(dtype, torch.dtype) or dtype not in _FLOAT_DTYPES:
            raise TypeError(f"dtype must be one of {_FLOAT_DTYPES}, got {dtype}")
        check_blocksize(blocksize)
        packed, absmax = _plain(packed), _plain(absmax)
        nested_absmax = None if nested_absmax is None else _plain(nested_absmax)
        offset = None if offset is None else _plain(offset)
        if isinstance(offset, torch.Tensor) and offset.is_floating_point() and offset.dtype != torch.float32:
            offset = offset.float()  # a float32 scalar in bitsandbytes; accept another float width, as bitsandbytes does
        double_quant = nested_absmax is not None
        if quant_map is None:
            quant_map = reference.nf4_code(getattr(packed, "device", "cpu"))
        elif not isinstance(quant_map, torch.Tensor):
            raise TypeError(f"quant_map must be a torch.Tensor, got {type(quant_map).__name__}")
        elif quant_map.dtype != torch.float32 or quant_map.numel() != 16:
            raise ValueError(f"quant_map must be float32 [16] (the NF4 codebook), got {quant_map.dtype} {tuple(quant_map.shape)}")
        elif not torch.equal(quant_map.detach().cpu().reshape(-1), reference.nf4_code()):
            raise ValueError("quant_map is not the NF4 codebook (is this an FP4 or custom 4-bit weight?)")
        quant_map = _plain(quant_map)
        if double_quant:
            if nested_quant_map is None:
                nested_quant_map = reference.dynamic_map(True, getattr(packed, "device", "cpu"))
            elif not isinstance(nested_quant_map, torch.Tensor):
                raise TypeError(f"nested_quant_map must be a torch.Tensor, got {type(nested_quant_map).__name__}")
            nested_quant_map = _plain(nested_quant_map)
        else:
            nested_quant_map = None
        check_nf4_storage(
            packed, absmax, nested_absmax, offset, n * k, blocksize, quant_map, nested_quant_map, check_values=True
        )
        fields = dict(
            packed=packed,
            absmax=absmax,
            nested_absmax=nested_absmax,
            offset=None if offset is None else offset.reshape(()),
            quant_map=quant_map,
            nested_quant_map=nested_quant_map,
            shape=torch.Size((n, k)),
            dtype=dtype,
            blocksize=blocksize,
        )
        for name, value in fields.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        # Validated once, then frozen: a field swapped afterwards (a shorter nested_absmax, say) would reach the
        # kernels unchecked. Build a new NF4Weight instead.
        raise AttributeError(f"NF4Weight is immutable (validated at construction): cannot set {name!r}; build a new one")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"NF4Weight is immutable: cannot delete {name!r}")

    # ------------------------------------------------------------------------------------------------ creation

    @classmethod
    def quantize(
        cls,
        weight: torch.Tensor,
        blocksize: int = 64,
        double_quant: bool = True,
        quant_storage: torch.dtype = torch.uint8,
    ) -> "NF4Weight":
        """Quantize a float weight [N, K] (fp16/bf16/fp32) to NF4, byte for byte as
        ``bitsandbytes.functional.quantize_4bit(weight, quant_type="nf4", blocksize=blocksize,
        compress_statistics=double_quant, quant_storage=quant_storage)``."""
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
        if weight.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"weight must be float16, bfloat16 or float32, got {weight.dtype}")
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D [N, K], got {weight.dim()}-D shape {tuple(weight.shape)}")
        if weight.numel() == 0:
            raise ValueError(f"weight must have at least one element, got shape {tuple(weight.shape)}")
        check_blocksize(blocksize)
        if not isinstance(double_quant, bool):
            raise TypeError(f"double_quant must be a bool, got {type(double_quant).__name__}")
        if quant_storage not in (torch.uint8,) + _FLOAT_DTYPES:
            raise TypeError(f"quant_storage must be uint8, float16, bfloat16 or float32, got {quant_storage}")
        nbytes = (weight.numel() + 1) // 2
        itemsize = torch.empty((), dtype=quant_storage).element_size()
        if nbytes % itemsize:
            raise ValueError(
                f"quant_storage={quant_storage} needs a byte count divisible by {itemsize}; "
                f"shape {tuple(weight.shape)} packs into {nbytes} bytes"
            )
        if not bool(torch.isfinite(weight).all()):
            raise ValueError("weight contains NaN or Inf; NF4 cannot represent them")
        w = weight.detach()
        packed, absmax, nested_absmax, offset = ops.quantize_nf4(w, blocksize, double_quant)
        packed = packed.view(quant_storage).reshape(-1, 1)
        return cls(
            packed,
            absmax,
            w.shape,
            w.dtype,
            blocksize,
            nested_absmax if double_quant else None,
            offset if double_quant else None,
        )

    @classmethod
    def from_bnb(cls, source: Any, quant_state: Any = None) -> "NF4Weight":
        """A zero-copy view of bitsandbytes NF4 storage.

        ``source`` is a ``bnb.nn.Linear4bit``, its ``Params4bit`` weight, or the packed tensor returned by
        ``bitsandbytes.functional.quantize_4bit`` together with its ``quant_state``. The packed bytes, absmax,
        nested absmax and offset tensors are shared, not copied.
        """
        packed = source
        if quant_state is None:
            weight = getattr(source, "weight", source)  # Linear4bit -> Params4bit
            quant_state = getattr(weight, "quant_state", None)
            if quant_state is None:
                raise ValueError(
                    f"{type(source).__name__} carries no bitsandbytes quant_state: pass a quantized Linear4bit or "
                    "Params4bit (bitsandbytes quantizes when the module is moved to a device), or (packed, quant_state)"
                )
            packed = weight.data if isinstance(weight, torch.nn.Parameter) else weight
        if not isinstance(packed, torch.Tensor):
            raise TypeError(f"source must be a Linear4bit, Params4bit or packed torch.Tensor, got {type(source).__name__}")
        quant_type = getattr(quant_state, "quant_type", None)
        if quant_type != "nf4":
            raise ValueError(
                f"quant_state.quant_type must be 'nf4', got {quant_type!r}"
                + (": FP4 is a different 4-bit format (uniform-exponent levels), not NF4" if quant_type == "fp4" else "")
            )
        if in_bnb_cpu_layout(quant_state):
            raise ValueError(
                "bitsandbytes has rewritten this weight into its CPU inference layout (reordered bytes, bf16 absmax; it "
                "does so at an eval-mode CPU forward on AVX512-BF16 machines), which is not NF4 storage: restore it "
                "with bitsandbytes.functional._convert_weight_packed_for_cpu_inverse, or use QLoRALinear.from_bnb"
            )
        if quant_state.shape is None or len(quant_state.shape) != 2:
            raise ValueError(f"quant_state.shape must be [N, K], got {quant_state.shape}")
        nested = getattr(quant_state, "nested", False)
        return cls(
            packed,
            quant_state.absmax,
            tuple(quant_state.shape),
            quant_state.dtype,
            quant_state.blocksize,
            quant_state.state2.absmax if nested else None,
            quant_state.offset if nested else None,
            quant_map=quant_state.code,
            nested_quant_map=quant_state.state2.code if nested else None,
        )

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor], prefix: str = "weight") -> "NF4Weight":
        """Load from bitsandbytes' state-dict keys (``prefix``, ``prefix.absmax``, ``prefix.quant_map``,
        ``prefix.nested_absmax``, ``prefix.nested_quant_map``, ``prefix.quant_state.bitsandbytes__nf4``), as a
        ``Linear4bit`` writes them. Tensors are used as they are (no copy)."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping of str to Tensor, got {type(state_dict).__name__}")
        p = prefix
        if f"{p}.{_FP4_STATE_KEY}" in state_dict:
            raise ValueError(f"{p!r} holds an FP4 weight ({p}.{_FP4_STATE_KEY}); FP4 is not NF4")
        missing = [k for k in (p, f"{p}.absmax", f"{p}.quant_map", f"{p}.{_QUANT_STATE_KEY}") if k not in state_dict]
        if missing:
            raise ValueError(f"state_dict lacks the NF4 keys {missing} (prefix {p!r})")
        meta = _read_quant_state(state_dict[f"{p}.{_QUANT_STATE_KEY}"], f"{p}.{_QUANT_STATE_KEY}")
        double_quant = "nested_absmax" in meta or "nested_offset" in meta or f"{p}.nested_absmax" in state_dict
        nested_absmax = offset = nested_map = None
        if double_quant:
            missing = [k for k in (f"{p}.nested_absmax", f"{p}.nested_quant_map") if k not in state_dict]
            if missing or "nested_offset" not in meta:
                raise ValueError(f"double-quantized state lacks {missing or ['nested_offset']} (prefix {p!r})")
            nested_blocksize = _meta_int(meta, "nested_blocksize", f"{p}.{_QUANT_STATE_KEY}", reference.NESTED_BLOCKSIZE)
            if nested_blocksize != reference.NESTED_BLOCKSIZE:
                raise ValueError(f"nested_blocksize must be {reference.NESTED_BLOCKSIZE}, got {nested_blocksize}")
            nested_dtype = meta.get("nested_dtype", "float32")
            if nested_dtype != "float32":
                raise ValueError(f"{p}.{_QUANT_STATE_KEY}['nested_dtype'] must be 'float32', got {nested_dtype!r}")
            nested_absmax = _state_tensor(state_dict, f"{p}.nested_absmax")
            nested_map = _state_tensor(state_dict, f"{p}.nested_quant_map")
            offset_value = meta["nested_offset"]
            if isinstance(offset_value, bool) or not isinstance(offset_value, (int, float)):
                raise ValueError(
                    f"{p}.{_QUANT_STATE_KEY}['nested_offset'] must be a number, got {type(offset_value).__name__}"
                )
            offset = torch.tensor(float(offset_value), dtype=torch.float32, device=nested_absmax.device)
        shape = meta["shape"]
        if not isinstance(shape, list):
            raise ValueError(f"{p}.{_QUANT_STATE_KEY}['shape'] must be a list [N, K], got {type(shape).__name__}")
        try:
            check_shape(shape, f"{p}.{_QUANT_STATE_KEY}['shape']")
        except TypeError as exc:
            raise ValueError(str(exc)) from None
        blocksize = _meta_int(meta, "blocksize", f"{p}.{_QUANT_STATE_KEY}")
        dtype_name = meta["dtype"]
        if not isinstance(dtype_name, str):
            raise ValueError(f"{p}.{_QUANT_STATE_KEY}['dtype'] must be a string, got {type(dtype_name).__name__}")
        return cls(
            _state_tensor(state_dict, p),
            _state_tensor(state_dict, f"{p}.absmax"),
            tuple(shape),
            _dtype_from_name(dtype_name, f"{p}.{_QUANT_STATE_KEY}['dtype']"),
            blocksize,
            nested_absmax,
            offset,
            quant_map=_state_tensor(state_dict, f"{p}.quant_map"),
            nested_quant_map=nested_map,
        )

    def state_dict(self, prefix: str = "weight") -> dict[str, torch.Tensor]:
        """bitsandbytes' state-dict entries for this weight, loadable by ``Params4bit.from_prequantized`` and by a
        ``Linear4bit``'s ``load_state_dict``."""
        meta: dict[str, Any] = {
            "quant_type": "nf4",
            "blocksize": self.blocksize,
            "dtype": _dtype_name(self.dtype),
            "shape": list(self.shape),
        }
        sd = {prefix: self.packed, f"{prefix}.absmax": self.absmax, f"{prefix}.quant_map": self.quant_map}
        if self.double_quant:
            sd[f"{prefix}.nested_absmax"] = self.nested_absmax
            sd[f"{prefix}.nested_quant_map"] = self.nested_quant_map
            meta.update(
                nested_blocksize=reference.NESTED_BLOCKSIZE,
                nested_dtype="float32",
                nested_offset=float(self.offset.item()),
            )
        sd[f"{prefix}.{_QUANT_STATE_KEY}"] = torch.tensor(list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)
        return sd

    # ------------------------------------------------------------------------------------------------- use

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def quant_storage(self) -> torch.dtype:
        return self.packed.dtype

    @property
    def numel(self) -> int:
        return self.shape.numel()

    @property
    def nbytes(self) -> int:
        """Bytes of storage: packed codes plus absmax (and nested absmax)."""
        total = self.packed.numel() * self.packed.element_size() + self.absmax.numel() * self.absmax.element_size()
        if self.double_quant:
            total += self.nested_absmax.numel() * 4 + 4
        return total

    def op_storage(self) -> tuple:
        """The storage flattened as the ``qlora_kernels::`` custom ops take it (the one place it is flattened):
        ``(packed bytes, absmax, nested_absmax, offset, nested_code, blocksize)``, the nested entries None without
        double quantization."""
        return self.packed_bytes(), self.absmax, self.nested_absmax, self.offset, self.nested_quant_map, self.blocksize

    def packed_bytes(self) -> torch.Tensor:
        """The packed codes as a flat uint8 view [(N·K + 1) // 2] (shares storage)."""
        return self.packed.reshape(-1).view(torch.uint8)

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The dense weight [N, K] in ``dtype`` (default: the original weight dtype), equal to
        ``bitsandbytes.functional.dequantize_4bit``: ``code[nibble] · absmax`` in float32, cast once."""
        dtype = self.dtype if dtype is None else dtype
        if not isinstance(dtype, torch.dtype) or dtype not in _FLOAT_DTYPES:
            raise TypeError(f"dtype must be float16, bfloat16 or float32, got {dtype}")
        return ops.dequantize_nf4(*self.op_storage(), list(self.shape), dtype)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "NF4Weight":
        """A copy on ``device`` (the same object when it is already there)."""
        device = torch.device(device)
        if device == self.device or (device.index is None and device.type == self.device.type):
            return self

        def move(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return NF4Weight(
            move(self.packed),
            move(self.absmax),
            self.shape,
            self.dtype,
            self.blocksize,
            move(self.nested_absmax),
            move(self.offset),
            quant_map=move(self.quant_map),
            nested_quant_map=move(self.nested_quant_map),
        )

    def cuda(self, device: Optional[int] = None) -> "NF4Weight":
        return self.to(torch.device("cuda", device) if device is not None else "cuda")

    def cpu(self) -> "NF4Weight":
        return self.to("cpu")

    def __repr__(self) -> str:
        n, k = self.shape
        dq = ", double_quant" if self.double_quant else ""
        return (
            f"NF4Weight(shape=({n}, {k}), dtype={_dtype_name(self.dtype)}, blocksize={self.blocksize}{dq}, "
            f"device={self.device}, storage={_dtype_name(self.quant_storage)}, {_format_bytes(self.nbytes)})"
        )
