"""Checkpoint files: lazy readers (`read/`), streaming atomic writers behind one interface (`write/`), and what
both use (raw spans, CRC-32, manifests)."""
