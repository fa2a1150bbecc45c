"""Evaluation: caption metrics (:mod:`.scoring`), result files (:mod:`.results`), the metrics table
(:mod:`.table`), the style classifier, the eval run (:mod:`.run`), the eval
page (:mod:`.report`) and training curves (:mod:`.curves`)."""
