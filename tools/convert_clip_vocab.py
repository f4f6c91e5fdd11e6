"""Convert CLIP's BPE file (from open-clip-torch's wheel) to vocab.json / merges.txt for CLIPTokenizer."""

import gzip
import json
import sys
from pathlib import Path


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


src, out = Path(sys.argv[1]), Path(sys.argv[2])
lines = gzip.open(src).read().decode("utf-8").split("\n")
merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
vocab = list(bytes_to_unicode().values())
vocab = vocab + [v + "</w>" for v in vocab]
vocab += ["".join(m) for m in merges]
vocab += ["<|startoftext|>", "<|endoftext|>"]
assert len(vocab) == 49408, len(vocab)
(out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
(out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
