"""Checks of a plan against its target: validation (keys, shapes, dtypes), choosing inferred parameters, and
numerical verification of a written conversion."""
