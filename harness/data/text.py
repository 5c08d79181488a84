"""Instruction text encoders, found by name: ``get_text_encoder("hash" | "clip")``.

Each encoder maps a list of strings to a list of (n_tokens, D) float32 token embeddings, one string at a
time and without padding, like the 3D-LOTUS preprocessing (CLIP last hidden state, every token kept).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re

import numpy as np

log = logging.getLogger(__name__)

CLIP_MODEL = "openai/clip-vit-base-patch32"


class HashTextEncoder:
    """Deterministic offline encoder: every word maps to a fixed pseudo-random vector.

    It carries NO pretrained semantics: "red" and "crimson" are as far apart as "red" and "drawer". It
    exists so the embedded Meta-World suite runs with no downloaded weights; with it, the language input
    only identifies the instruction string. Tokens are [<sos>, lower-cased words and punctuation, <eos>];
    each token vector is a unit-variance Gaussian seeded by the BLAKE2 hash of the token plus a small
    sinusoidal position code, so the same word at different positions differs, as in a contextual encoder.
    """

    name = "hash"

    def __init__(self, dim: int = 512):
        self.dim = dim

    def tokenize(self, text: str) -> list[str]:
        return ["<sos>", *re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower()), "<eos>"]

    def _token_vector(self, token: str) -> np.ndarray:
        seed = int.from_bytes(hashlib.blake2b(token.encode(), digest_size=8).digest(), "little")
        return np.random.default_rng(seed).standard_normal(self.dim).astype(np.float32)

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        out = []
        half = self.dim // 2
        freqs = np.exp(-np.log(1e4) * np.arange(half) / half)
        for text in texts:
            tokens = self.tokenize(text)
            vecs = np.stack([self._token_vector(t) for t in tokens])
            pos = np.arange(len(tokens))[:, None] * freqs[None]
            vecs[:, : 2 * half] += 0.1 * np.concatenate([np.sin(pos), np.cos(pos)], axis=1)
            out.append(vecs.astype(np.float32))
        return out


class ClipTextEncoder:
    """CLIP ViT-B/32 text transformer (HF transformers): last hidden state, all tokens, 512-d.

    Needs the weights already on disk (the HF cache, or a folder in ``MDH_CLIP_PATH``); nothing is ever
    downloaded (``local_files_only=True``).
    """

    name = "clip"

    def __init__(self, model: str | None = None):
        import torch
        from transformers import CLIPTextModel, CLIPTokenizer

        source = model or os.environ.get("MDH_CLIP_PATH") or CLIP_MODEL
        self.tokenizer = CLIPTokenizer.from_pretrained(source, local_files_only=True)
        self.model = CLIPTextModel.from_pretrained(source, local_files_only=True).eval()
        self.dim = self.model.config.hidden_size
        self._torch = torch

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        out = []
        with self._torch.no_grad():
            for text in texts:
                tokens = self.tokenizer(text, return_tensors="pt")
                hidden = self.model(**tokens).last_hidden_state[0]
                out.append(hidden.float().numpy())
        return out


ENCODERS = {"hash": HashTextEncoder, "clip": ClipTextEncoder}


def get_text_encoder(name: str, fallback: bool = True):
    """The encoder called ``name``. If CLIP weights (or transformers) are missing and ``fallback`` is true,
    log a warning saying so and return the "hash" encoder; check ``.name`` for the one actually used."""
    if name not in ENCODERS:
        raise ValueError(f"unknown text encoder {name!r}; choices: {sorted(ENCODERS)}")
    if name == "hash":
        return HashTextEncoder()
    try:
        return ENCODERS[name]()
    except Exception as e:  # ImportError, OSError from a missing cache entry, ...
        if not fallback:
            raise
        log.warning("text encoder %r unavailable (%s: %s); FELL BACK to the 'hash' encoder, which carries no "
                    "pretrained semantics. Put the CLIP ViT-B/32 weights in the HF cache or MDH_CLIP_PATH and "
                    "install the 'clip' extra to use CLIP.", name, type(e).__name__,
                    (str(e).splitlines() or [""])[0])  # an exception may carry no message
        return HashTextEncoder()
