"""The names of what the toolkit writes and reads: work_dir's layout, the files a trained model dir carries,
the data formats, and the names the toolkit registers with ModelScope. Declared once, here."""
from __future__ import annotations

# work_dir
OUTPUT_DIR = 'output'                    # work_dir/output: the trained model (newest checkpoint's weights)
BEST_DIR = 'output_best'                 # work_dir/output_best: the best validated model
VAL_METRICS_FILE = 'val_metrics.jsonl'   # work_dir/val_metrics.jsonl: one line per validation
LOCK_FILE = '.train.lock'                # work_dir/.train.lock: one training run per work_dir
CHECKPOINT_CHECKSUM_SUFFIX = '.sha256'   # work_dir/iter_N.sha256: sha256 of iter_N.pth and iter_N_trainer_state.pth

# a trained model dir
STYLE_MAP_FILE = 'style_map.json'        # the style -> prompt token map the model was trained with
CLASSIFIER_DIR = 'style_classifier'      # the style classifier of the train split (style accuracy)
WEIGHTS_FILES = ('pytorch_model.bin', 'pytorch_model.pt')  # the weights file ModelScope loads from a model dir
WEIGHTS_CHECKSUM_FILE = 'weights.sha256'  # sha256 of the weights file, written with it (utils/core/checksums.py)

# data
PERSONALITIES_FILE = 'personalities.txt'  # optional list of styles beside the PCap files
DATA_SUFFIXES = ('.json', '.jsonl', '.csv', '.parquet')  # the split files the toolkit reads

# registered with ModelScope (configuration.json's preprocessor.type and pipeline.type)
STYLISH_IC_PREPROCESSOR = 'ofa-stylish-image-captioning-preprocessor'
STYLISH_IC_PIPELINE = 'ofa-stylish-image-captioning'
