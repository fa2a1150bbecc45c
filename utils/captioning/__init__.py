"""Captioning: the stylish preprocessor (:mod:`.preprocessor`), the batched captioner every entry point
uses (:mod:`.captioner`) and the ModelScope pipeline over it (:mod:`.pipeline`)."""
