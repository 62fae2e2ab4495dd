"""Reference implementations of source models, used by `--verify`."""
