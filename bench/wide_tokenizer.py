"""Widen a byte-level BPE tokenizer to a model's vocabulary (standard library only), for serving a random
model of real shapes (`nsa serve --load-format dummy`) with a small tokenizer: ids past the tokenizer's own
decode to filler words (" w1024", " w1025", ...) instead of nothing, so every generated token streams text.

    python3 bench/wide_tokenizer.py models/tiny-v32 /tmp/wide-tokenizer 129280
"""
import json
import os
import shutil
import sys


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    source, target, vocab = sys.argv[1], sys.argv[2], int(sys.argv[3])
    tokenizer = json.load(open(os.path.join(source, "tokenizer.json"), encoding="utf-8"))
    words = tokenizer["model"]["vocab"]
    taken = set(words.values()) | {t["id"] for t in tokenizer["added_tokens"]}
    if max(taken) >= vocab:
        sys.exit(f"the tokenizer already has ids up to {max(taken)}; nothing to widen to {vocab}")
    for i in range(vocab):
        if i not in taken:
            word = "\u0120w%d" % i  # Ġ: byte-level's space
            if word in words:
                sys.exit(f"filler {word!r} is already a token")
            words[word] = i
    os.makedirs(target, exist_ok=True)
    with open(os.path.join(target, "tokenizer.json"), "w", encoding="utf-8") as out:
        json.dump(tokenizer, out, ensure_ascii=False)
    for name in ("tokenizer_config.json",):
        if os.path.exists(os.path.join(source, name)):
            shutil.copy(os.path.join(source, name), target)
    print(f"{target}/tokenizer.json: {len(words)} vocabulary entries + {len(tokenizer['added_tokens'])} added")


if __name__ == "__main__":
    main()
