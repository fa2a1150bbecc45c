"""Style-conditioned OFA captioning preprocessors and pipeline; importing this registers them with ModelScope."""
from .pipeline import STYLISH_IC_PIPELINE, StylishImageCaptioningPipeline
from .stylish_ic import STYLISH_IC_PREPROCESSOR, OfaPreprocessorForStylishIC, OfaStylishICPreprocessor

__all__ = ['STYLISH_IC_PIPELINE', 'STYLISH_IC_PREPROCESSOR', 'OfaPreprocessorForStylishIC', 'OfaStylishICPreprocessor',
           'StylishImageCaptioningPipeline']
