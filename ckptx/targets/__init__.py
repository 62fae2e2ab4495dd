"""Targets: what converted weights must fit (a model factory built on the meta device, a reference checkpoint, a
manifest), resolved to key -> shape/dtype."""
