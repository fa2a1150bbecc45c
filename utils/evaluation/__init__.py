"""Evaluation: caption metrics (:mod:`.scoring`), the style classifier, the eval run (:mod:`.run`), the eval
page (:mod:`.report`) and training curves (:mod:`.curves`)."""
