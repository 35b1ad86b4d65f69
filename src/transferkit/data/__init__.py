"""Datasets, transforms and loaders; nothing here knows about models."""
