"""The offline demo: a tiny random OFA model dir (:mod:`.tiny_model`) and a synthetic data set whose captions
follow the style and the image (:mod:`.data`)."""
