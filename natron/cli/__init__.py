"""The composition root: the `natron` command, `natron serve`'s supervisor, and the wiring that
runs one service per process. This is the only package that imports every service; nothing
below it imports it back (see the import-linter contracts in pyproject.toml).
"""
