"""Structured pruning machinery shared by every structured method: per-layer shapes, surgery on
linears, stand-ins for removed sublayers, and reloading of non-uniform checkpoints."""
