"""Dtype names: torch's (`float32`), safetensors' (`F32`) and torch dtype objects."""

from __future__ import annotations

from ckptx._lazy import lazy_module

torch = lazy_module("torch")


SAFETENSORS_CODES: dict[str, str] = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8",
    "uint64": "U64", "uint32": "U32", "uint16": "U16", "uint8": "U8", "bool": "BOOL",
    "complex64": "C64",
}
FROM_SAFETENSORS: dict[str, str] = {code: name for name, code in SAFETENSORS_CODES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.float32` -> `float32`."""
    return str(dtype).removeprefix("torch.")


def torch_dtype(name: str) -> torch.dtype:
    """`float32` -> `torch.float32`."""
    return getattr(torch, name)
