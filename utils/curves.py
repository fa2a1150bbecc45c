"""``python -m utils.curves WORK_DIR``: draw a run's training curves (loss, learning rate, validation metrics)
as PNGs in work_dir. The drawing is :mod:`utils.evaluation.curves`."""
import sys

from utils.evaluation.curves import main

if __name__ == '__main__':
    sys.exit(main())
