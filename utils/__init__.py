"""The stylised-captioning toolkit's library. Its sub-packages are layers, each importing only from those
below it (the contract in pyproject.toml, checked by ``lint-imports``):

    utils.metrics | utils.backup_model | utils.curves    the ``python -m`` commands (a table of contents each)
    utils.backup | utils.demo                            archives of a trained model; the offline demo
    utils.training                                       OFATrainer assembly, stages, validation, resume
    utils.evaluation                                     metrics, result files, style classifier, report, curves
    utils.captioning                                     preprocessor, captioner, ModelScope pipeline
    utils.data | utils.patches                           rows, formats, styles, images | ModelScope patches
    utils.core                                           conf, errors, CLI harness, layout, I/O, logging

``preprocessors`` (top level) registers the captioning layer's classes with ModelScope.
"""
__version__ = '0.1.0'
