"""Build a tiny, randomly initialised OFA captioning model dir in ModelScope layout, offline.

Used by the offline demo and by the tests: nothing can be downloaded from a model hub there. The dir
holds what a hub model dir holds: configuration.json (ModelScope), config.json (OFAConfig),
vocab.json + merges.txt (byte-level BPE trained on the given texts), pytorch_model.bin.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Iterable, Optional

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ['<s>', '<pad>', '</s>', '<unk>', '<mask>']
N_CODES, N_BINS = 8192, 1000  # tokens ModelScope's OFA preprocessor adds to the tokenizer


def build_tiny_ofa(model_dir: str, texts: Iterable[str], *, d_model: int = 64, layers: int = 2,
                   image_size: int = 64, bpe_vocab_size: int = 400, seed: int = 0, heads: int = 4,
                   resnet_type: str = 'resnet18', text_vocab_size: Optional[int] = None) -> str:
    """Write a tiny random OFA model dir that ModelScope's Model.from_pretrained, OFATrainer,
    OfaPreprocessor and image-captioning pipeline accept. Returns model_dir.

    The defaults make a model small enough for tests on a CPU. With d_model, layers, heads, resnet_type
    and ``text_vocab_size=50265`` (the BPE vocabulary is padded with unused tokens up to that size, as in
    the real OFA vocabulary of 50265 + 8192 codes + 1000 bins) it has the shape of a real OFA size:
    OFA-tiny is d_model 256, 4+4 layers, 4 heads, resnet50; OFA-base 768, 6+6, 12, resnet101."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from modelscope.models.multi_modal.ofa import OFAModel
    from modelscope.models.multi_modal.ofa.configuration_ofa import OFAConfig

    out = Path(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    texts = [' ' + t for t in texts] + [' what does the image describe? write a reply.']
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=bpe_vocab_size, min_frequency=1, special_tokens=SPECIAL_TOKENS)
    with tempfile.TemporaryDirectory() as tmp:
        bpe.save_model(tmp)
        for name in ('vocab.json', 'merges.txt'):
            (out / name).write_bytes((Path(tmp) / name).read_bytes())
    base_vocab = bpe.get_vocab_size()
    if text_vocab_size and text_vocab_size > base_vocab:  # unused tokens, for a realistic output layer
        vocab = json.loads((out / 'vocab.json').read_text(encoding='utf-8'))
        vocab.update({f'<unused_{i}>': i for i in range(base_vocab, text_vocab_size)})
        (out / 'vocab.json').write_text(json.dumps(vocab), encoding='utf-8')
        base_vocab = text_vocab_size

    config = OFAConfig(
        vocab_size=base_vocab + N_CODES + N_BINS,
        max_position_embeddings=64,
        encoder_layers=layers, decoder_layers=layers,
        encoder_ffn_dim=4 * d_model, decoder_ffn_dim=4 * d_model,
        encoder_attention_heads=heads, decoder_attention_heads=heads,
        d_model=d_model,
        dropout=0.0,
        resnet_type=resnet_type,
        token_bucket_size=32, image_bucket_size=max(4, image_size // 16 + 1),
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=0, forced_eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = OFAModel(config)
    config.save_pretrained(str(out))
    torch.save(model.state_dict(), out / 'pytorch_model.bin')

    configuration = {
        'framework': 'pytorch',
        'task': 'image-captioning',
        'model': {
            'type': 'ofa',
            'language': 'en',
            'gen_type': 'generation',
            'patch_image_size': image_size,
            'max_image_size': image_size,
            'max_src_length': 64,
            'max_tgt_length': 32,
            'imagenet_default_mean_and_std': False,
            'beam_search': {'beam_size': 5, 'max_len_b': 16, 'min_len': 1, 'no_repeat_ngram_size': 3},
        },
        'pipeline': {'type': 'image-captioning'},
        'preprocessor': {},
    }
    (out / 'configuration.json').write_text(json.dumps(configuration, indent=2), encoding='utf-8')
    logger.info('tiny OFA model written: %s (d_model %d, %d+%d layers, vocab %d)',
                out.resolve(), d_model, layers, layers, config.vocab_size)
    return os.fspath(out)
