"""Data: rows of the split files and their formats (:mod:`.rows`), images of rows (:mod:`.images`), the
style -> prompt map (:mod:`.styles`), the training dataset (:mod:`.dataset`) and its image cache."""
