"""Style-conditioned OFA captioning preprocessors; importing this registers them with ModelScope."""
from .stylish_ic import STYLISH_IC_PREPROCESSOR, OfaPreprocessorForStylishIC, OfaStylishICPreprocessor

__all__ = ['STYLISH_IC_PREPROCESSOR', 'OfaPreprocessorForStylishIC', 'OfaStylishICPreprocessor']
