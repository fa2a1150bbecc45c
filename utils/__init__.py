"""Helpers of the stylised-captioning toolkit (conf, data, styles, captioning, metrics, backup)."""
__version__ = '0.1.0'
