"""The plan: its data model (expressions, entries, the source protocol), the planner that applies a recipe's steps
to source metadata, the accounting invariant, and the execution of one entry on real tensors."""
