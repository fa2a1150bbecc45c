"""``python -m utils.backup_model``: back up a trained model with its conf, verify an archive, restore one.

    python -m utils.backup_model --conf C [-o OUT_DIR] [-e | -n] [--checkpoint CKPT | -m MODEL_DIR]
    python -m utils.backup_model --verify ARCHIVE
    python -m utils.backup_model --restore ARCHIVE DIR

The command's table of contents; the work is in :mod:`utils.backup`.
"""
import sys

from utils.backup.backup import main

if __name__ == '__main__':
    sys.exit(main())
