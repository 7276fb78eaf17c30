"""Benchmark: open_clip's tokenizer on worst-case captions, and the caps mmia puts on them.

open_clip's `SimpleTokenizer` BPE-encodes each word (a run of letters, or of symbols) as one
piece, in time super-linear in its length: a 99,000-character caption without spaces took
~213 s. This prints the tokenizer's time (best of --repeat, its word cache emptied first) for

1. one word of n characters, for several kinds of characters;
2. the worst captions mmia still accepts: distinct words of up to MAX_CAPTION_WORD_CHARS
   characters, as many as fit in MAX_CAPTION_BYTES, random Unicode text, ordinary captions;
3. mmia's own check (`caption_refusal`) on those captions.

    python experiments/bench_tokenizer.py [--repeat 3] [--max-word 2048]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import unicodedata

import open_clip

from mmia.shards import MAX_CAPTION_BYTES, MAX_CAPTION_WORD_CHARS, caption_refusal

LETTERS = [chr(c) for c in range(0x30000) if unicodedata.category(chr(c)).startswith("L")]
LATIN = [c for c in LETTERS if 0xC0 <= ord(c) < 0x250]
EMOJI = [chr(c) for c in range(0x1F300, 0x1FAFF) if unicodedata.category(chr(c)) == "So"]
ORDINARY = [
    "Vintage 1950s Red Dress with White Polka Dots, size M - Women's Clothing | Etsy",
    "A living room with a grey sofa, a wooden coffee table and plants by the window.",
    "2019新款韩版宽松显瘦连衣裙女夏季中长款",
]


def kinds(rng: random.Random) -> dict:
    """Word makers: n characters of one kind, chosen at random."""
    return {
        "ascii": lambda n: "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(n)),
        "latin": lambda n: "".join(rng.choice(LATIN) for _ in range(n)),
        "cjk": lambda n: "".join(chr(rng.randint(0x4E00, 0x9FFF)) for _ in range(n)),
        "any letter": lambda n: "".join(rng.choice(LETTERS) for _ in range(n)),
        "emoji": lambda n: "".join(rng.choice(EMOJI) for _ in range(n)),
    }


def timer(tokenizer, repeat: int):
    """ms to tokenise a text, best of `repeat`, with the tokenizer's word cache emptied."""
    special = dict(tokenizer.cache)

    def ms(text: str) -> float:
        best = float("inf")
        for _ in range(repeat):
            tokenizer.cache = dict(special)
            start = time.perf_counter()
            tokenizer([text])
            best = min(best, time.perf_counter() - start)
        return best * 1e3

    return ms


def random_char(rng: random.Random) -> str:
    """A random assigned code point (letter, mark, symbol, digit, space) of planes 0-2."""
    while True:
        c = chr(rng.randint(0x20, 0x2FFFF))
        if unicodedata.category(c) not in ("Cn", "Cs", "Co", "Cc"):
            return c


def fill(piece) -> str:
    """The longest text made of `piece()`s that mmia still accepts (the worst of its kind)."""
    text = ""
    for _ in range(10 * MAX_CAPTION_BYTES):
        longer = text + piece()
        if caption_refusal(longer) is not None:
            if len(longer.encode()) > MAX_CAPTION_BYTES:
                break
            continue  # a word that cleaning made too long: try another
        text = longer
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--max-word", type=int, default=2048)
    args = parser.parse_args()
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    ms = timer(tokenizer, args.repeat)
    rng = random.Random(0)
    makers = kinds(rng)
    print(f"python {sys.version.split()[0]}, open_clip {open_clip.__version__}; "
          f"caps: {MAX_CAPTION_BYTES} bytes, words of {MAX_CAPTION_WORD_CHARS} chars")

    print("\n1. one word of n characters (ms)")
    print(f"{'n':>6} " + " ".join(f"{k:>11}" for k in makers))
    n = 16
    while n <= args.max_word:
        print(f"{n:>6} " + " ".join(f"{ms(make(n)):>11.2f}" for make in makers.values()))
        n *= 2

    print("\n2. captions mmia accepts (ms); 3. mmia's check on them (ms)")
    captions = {f"{w}-char {k} words": fill(lambda make=make, w=w: make(w) + " ")
                for k, make in makers.items() for w in (8, MAX_CAPTION_WORD_CHARS // 2,
                                                        MAX_CAPTION_WORD_CHARS)}
    captions["random unicode"] = fill(lambda: random_char(rng))
    for i, text in enumerate(ORDINARY):
        captions[f"ordinary caption {i + 1}"] = text
    worst = 0.0
    for name, text in captions.items():
        refusal = caption_refusal(text)
        start = time.perf_counter()
        caption_refusal(text)
        check = (time.perf_counter() - start) * 1e3
        took = ms(text)
        if refusal is None:
            worst = max(worst, took)
        state = "accepted" if refusal is None else f"refused ({refusal[0]})"
        size = f"{len(text)} chars, {len(text.encode())} bytes"
        print(f"{took:>8.2f} {check:>6.2f}  {name} ({size}): {state}")
    print(f"\nworst accepted caption: {worst:.1f} ms")


if __name__ == "__main__":
    main()
