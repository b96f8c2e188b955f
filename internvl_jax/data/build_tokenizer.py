"""Training a small SentencePiece tokenizer in the official InternLM2 layout (demo and tests).

Writes `tokenizer.model` (BPE with byte fallback, identity normalisation so chat templates round
trip exactly; the template's role tokens are single pieces) and the HF side files that declare
the nine InternVL tokens as added special tokens after the SentencePiece vocabulary.
"""
from __future__ import annotations

import io
import json
from typing import Iterable

import sentencepiece as spm
from etils import epath

from internvl_jax.data.tokenizer import INTERNVL_TOKENS

TEMPLATE_PIECES = ("<|im_start|>", "<|im_end|>")


def build_tokenizer(corpus: Iterable[str], out_dir: str | epath.PathLike, vocab_size: int = 512) -> epath.Path:
    """Trains on `corpus` lines and writes a loadable tokenizer directory; returns its path.

    The full vocabulary is `vocab_size` SentencePiece pieces + the InternVL tokens.
    """
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(corpus)), model_writer=buffer, model_type="bpe", vocab_size=vocab_size,
        user_defined_symbols=list(TEMPLATE_PIECES), byte_fallback=True, character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        split_digits=True, allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1, minloglevel=2, hard_vocab_limit=False)
    proto = buffer.getvalue()
    size = spm.SentencePieceProcessor(model_proto=proto).get_piece_size()
    out = epath.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(proto)
    decoder = {str(size + i): {"content": token, "lstrip": False, "normalized": False, "rstrip": False,
                               "single_word": False, "special": True} for i, token in enumerate(INTERNVL_TOKENS)}
    config = {"tokenizer_class": "InternLM2Tokenizer", "bos_token": "<s>", "eos_token": "</s>",
              "pad_token": "</s>", "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False,
              "added_tokens_decoder": decoder, "additional_special_tokens": list(INTERNVL_TOKENS)}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>",
         "additional_special_tokens": list(INTERNVL_TOKENS)}, indent=2))
    return out
