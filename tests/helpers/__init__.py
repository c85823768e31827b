"""Shared test helpers: model builders, structural doubles of public models, accuracy checks and the
scripts some tests launch in a subprocess. Imported as ``helpers.<module>`` (``tests/`` is on ``sys.path``)."""
