"""Import the built-in loader modules so that they register their datasets (see ``load_dataset``)."""

from edgetune.data import image_folder, instructions, synglyph, text, text_corpora, text_files, vision  # noqa: F401

__all__: list[str] = []
