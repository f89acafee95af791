"""A tiny CLIP BPE tokenizer written by the code itself, so no model hub is needed.

The vocabulary is the 256 byte-level symbols of CLIP's BPE (each also with the word-final `</w>` mark),
the merges of a few hundred frequent English letter pairs and the two special tokens. It tokenizes any
text (unknown words fall back to single characters) with the real `transformers.CLIPTokenizer`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from transformers import CLIPTokenizer

_CORPUS = (
    "a photo of the cat dog man woman portrait landscape painting style red blue green yellow black white "
    "sky sea mountain city street house tree flower car robot castle forest night day light dark beautiful "
    "high quality detailed sharp blurry ugly bad low anime watercolor oil sketch cinematic studio video frame"
)


def _bytes_to_unicode() -> dict[int, str]:
    # CLIP's byte -> printable-unicode table (the same bijection GPT-2 uses).
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def _merges_from_corpus(corpus: str, max_merges: int = 200) -> list[tuple[str, str]]:
    words = [list(w[:-1]) + [w[-1] + "</w>"] for w in corpus.split()]
    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        counts: dict[tuple[str, str], int] = {}
        for w in words:
            for pair in zip(w, w[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            break
        best = max(sorted(counts), key=lambda p: counts[p])
        if counts[best] < 2:
            break
        merges.append(best)
        merged = best[0] + best[1]
        new_words = []
        for w in words:
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new_words.append(out)
        words = new_words
    return merges


def write_tiny_clip_tokenizer(folder: str | os.PathLike, extra_words: str = "") -> Path:
    """Write `vocab.json` and `merges.txt` of the tiny CLIP tokenizer into `folder` and return it.

    `extra_words` are added to the merge corpus, each counted as often as needed to become one whole-word token
    (the toy world's caption words)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols]
    corpus = _CORPUS + (" " + " ".join([extra_words] * 2) if extra_words else "")
    merges = _merges_from_corpus(corpus, max_merges=200 + 8 * len(extra_words.split()))
    vocab_list += ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    return folder


def tiny_clip_tokenizer(folder: str | os.PathLike | None = None, model_max_length: int = 77,
                        extra_words: str = "") -> CLIPTokenizer:
    """Build the tiny CLIP tokenizer (files written to `folder`, or to a per-user cache folder)."""
    if folder is None:
        name = "tiny-clip-tokenizer"
        if extra_words:  # another vocabulary, another folder
            name += "-" + hashlib.sha256(extra_words.encode()).hexdigest()[:12]
        folder = Path(os.environ.get("ADAPTER_STUDIO_CACHE", Path.home() / ".cache" / "adapter-studio")) / name
    folder = Path(folder)
    if not (folder / "vocab.json").exists() or not (folder / "merges.txt").exists():
        write_tiny_clip_tokenizer(folder, extra_words)
    # from_pretrained is the ordinary path for a hub tokenizer folder; it reads vocab.json + merges.txt.
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=model_max_length, pad_token="<|endoftext|>")
