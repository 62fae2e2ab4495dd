"""Lazy readers: every checkpoint format opened as a `Source` (metadata up front, tensor data on demand)."""
