"""The toolkit's face to ModelScope: importing this package registers the style-conditioned OFA captioning
preprocessor and pipeline with ModelScope (``pipeline(Tasks.image_captioning, model=...)`` then builds them
from a trained model dir's ``configuration.json``).

The classes live in :mod:`utils.captioning` (``preprocessor``, ``pipeline``); this package is the stable name
users and model dirs know, kept as the top layer so that nothing inside the toolkit imports it.
"""
from utils.captioning.pipeline import StylishImageCaptioningPipeline
from utils.captioning.preprocessor import OfaPreprocessorForStylishIC, OfaStylishICPreprocessor
from utils.core.layout import STYLISH_IC_PIPELINE, STYLISH_IC_PREPROCESSOR

__all__ = ['STYLISH_IC_PIPELINE', 'STYLISH_IC_PREPROCESSOR', 'OfaPreprocessorForStylishIC', 'OfaStylishICPreprocessor',
           'StylishImageCaptioningPipeline']
