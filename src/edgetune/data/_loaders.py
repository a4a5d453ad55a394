"""Import the built-in loader modules so that they register their datasets (see ``load_dataset``)."""

from edgetune.data import synglyph, text, vision  # noqa: F401

__all__: list[str] = []
