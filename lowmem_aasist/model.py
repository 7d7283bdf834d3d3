"""Temporary: the old module path, while test files still being edited import from it."""

from .models.aasist import AASIST, ResidualBlock  # noqa: F401
