"""Architectures for the user's classes and what each family declares about itself."""
