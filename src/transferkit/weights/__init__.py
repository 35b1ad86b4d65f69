"""Pretrained tensors: where they come from, how they are read, matched and restored."""
