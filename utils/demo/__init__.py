"""The demos. The offline demo: a tiny random OFA model dir (:mod:`.tiny_model`), a synthetic data set whose
captions follow the style and the image (:mod:`.data`), its style-following report (:mod:`.report`) and its data
set written as your own data (:mod:`.export`). The web demo's gradio app (:mod:`.web_app`)."""
