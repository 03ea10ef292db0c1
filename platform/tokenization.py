"""Tokenizers for the CPU stage: a Hugging Face tokenizer by name or path, or the WordPiece
vocabulary a shard set ships (``vocab.txt``, e.g. the synthetic set's)."""
from __future__ import annotations

import os
import tempfile
from functools import lru_cache

from alignlab.models.inputs import Vocab
from alignlab.platform import shards


@lru_cache(maxsize=4)
def load_tokenizer(spec: str, shards_root: str):
    """``spec``: "auto" (the shard set's vocab.txt), a vocab.txt path, or a Hugging Face tokenizer
    name / local directory / ``pkg://`` folder (``AutoTokenizer.from_pretrained``). Cached per
    process, so each Ray Data worker loads it once."""
    from transformers import BertTokenizerFast

    if spec == "auto":
        text = shards.read_text(shards.child_uri(shards_root, "vocab.txt"))
        if text is None:
            raise FileNotFoundError(
                f"data.tokenizer = 'auto' but {shards.child_uri(shards_root, 'vocab.txt')} does not exist; "
                f"set data.tokenizer to a Hugging Face tokenizer name or path, or a vocab.txt file")
        # BertTokenizerFast reads a local file, and only while it is built: the copy of an
        # object-storage vocabulary goes as soon as it has (one was left per process before).
        with tempfile.TemporaryDirectory(prefix="alignlab-vocab-") as folder:
            path = os.path.join(folder, "vocab.txt")
            with open(path, "w") as f:
                f.write(text)
            return BertTokenizerFast(vocab=path, do_lower_case=True)
    if spec.endswith(".txt"):
        return BertTokenizerFast(vocab=spec, do_lower_case=True)
    # Imported here: both import torch (AutoTokenizer through transformers' model configs), seconds
    # of each Ray Data worker's start-up that a shard set's own vocab.txt does not need.
    from transformers import AutoTokenizer

    from alignlab.models.blocks import resolve_pretrained

    return AutoTokenizer.from_pretrained(resolve_pretrained(spec))


def vocab_info(tokenizer, shards_root: str) -> Vocab:
    """The model-facing summary: sizes, special ids, and the shard set's tag, phrase-concept and
    answer vocabularies (concepts tokenised, for MVPTR's mean-of-tokens initialisation)."""
    tags = tuple(shards.read_vocab_file(shards_root, "tags.txt"))
    concepts = tuple(
        tuple(tokenizer(line, add_special_tokens=False)["input_ids"])
        for line in shards.read_vocab_file(shards_root, "concepts.txt"))
    return Vocab(size=len(tokenizer), pad_id=tokenizer.pad_token_id, cls_id=tokenizer.cls_token_id,
                 sep_id=tokenizer.sep_token_id, mask_id=tokenizer.mask_token_id, tags=tags, concepts=concepts,
                 answers=tuple(shards.read_vocab_file(shards_root, "answers.txt")))
