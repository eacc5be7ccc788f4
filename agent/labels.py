"""Deprecated alias of :mod:`models.vocabulary` (the project's one vocabulary, at the bottom layer); import from there."""

from models.vocabulary import (  # noqa: F401
    HAM_CLASSES,
    HAM_NAMES,
    MALIGNANT,
    MODALITIES,
    SEVEN_POINT,
    SEVEN_POINT_PHRASES,
    SEVEN_POINT_SCORING,
    derm7pt_to_ham,
)
