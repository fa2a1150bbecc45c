"""``python -m utils.metrics RESULT_JSON [-o OUT.json] [--no-spice] [--conf C]``: score any result file
(an ``inference_*.json`` or ``eval_*.json``) with pycocoevalcap and the style classifier.

The command's table of contents; the scoring is :mod:`utils.evaluation.scoring`.
"""
import sys

from utils.evaluation.scoring import main

if __name__ == '__main__':
    sys.exit(main())
