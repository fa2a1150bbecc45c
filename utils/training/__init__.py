"""Training stages on ModelScope's OFATrainer: trainer assembly (:mod:`.trainer`), the run itself (:mod:`.run`).

``finetune.py train`` calls :func:`train`; everything it builds lives here, so a new stage is a new
module and a conf value, not a branch in the entry script.
"""
from utils.training.run import train  # noqa: F401
