"""Generate the prompt sets the shipped recipes train and evaluate on (``recipes/prompts/``).

    python scripts/make_prompts.py                 # (re)write recipes/prompts/*  (deterministic, seed 0)
    python scripts/make_prompts.py --check         # exit 1 if a shipped file differs from what this script writes

Every prompt is built here from our own word lists and templates (nothing is copied from other repositories'
prompt files). Each set is drawn without replacement from its template space with ``random.Random(seed)``, then
split so that no test prompt is a train prompt:

* ``aesthetic_{train,test}.txt``  general aesthetic prompts: subject + setting + style + light (PickScore-style use)
* ``styles_{train,test}.txt``     the same subjects in four style families: photo, painting, anime, concept art
                                   (HPS-style use)
* ``ocr_{train,test}.jsonl``      visual-text prompts ``{"prompt": ..., "text": ...}``; the OCR reward reads
                                   ``metadata["text"]`` (also the first double-quoted span of the prompt)
* ``geneval_{train,test}.jsonl``  GenEval-style compositional prompts with their checkable structure:
                                   ``tag`` in single_object | two_object | counting | colors | position |
                                   color_attr, and ``include`` = ``[{"class", "count", "color"?, "position"?}]``
* ``animals_simple.txt``          45 common animals (DDPO-style ``simple_animals`` use)
* ``animals_{train,test}.txt``    a wider animal list split into disjoint train/test animals
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "recipes" / "prompts"
N_TRAIN, N_TEST = 1000, 128  # test sizes divide every recipe's eval.batch_size (2, 4, 8, 16)

# ----------------------------------------------------------------------------------------------- word lists
SUBJECTS = [
    "an old lighthouse", "a red fox", "a mountain village", "a sailing ship", "a cup of coffee", "a vintage car",
    "a snowy owl", "a city street", "a field of sunflowers", "a stone bridge", "a hot air balloon", "a koi pond",
    "a desert canyon", "a grand piano", "a tea house", "a robot gardener", "a castle on a hill", "a bowl of ramen",
    "a waterfall", "a greenhouse", "a lone tree", "a market stall", "a steam train", "a jellyfish", "a library",
    "a bicycle", "a cat on a windowsill", "a fishing boat", "a glass bottle", "a wooden cabin", "a dragon",
    "a spaceship", "an astronaut", "a ballet dancer", "an elderly fisherman", "a violinist", "a young chef",
    "a knight in armor", "a hummingbird", "a bonsai tree", "a lantern festival", "a rainy alley",
    "a windmill", "a coral reef", "a mountain lake", "a pair of boots", "a chess board", "a bakery window",
    "a sleeping dog", "a tiger", "a hedgehog", "a pagoda", "a harbor town", "a treehouse", "a lighthouse keeper",
    "a street musician", "a basket of apples", "a rooftop garden", "a wolf", "a whale", "a clock tower",
]
SETTINGS = [
    "at sunrise", "at dusk", "under a starry sky", "in the fog", "after the rain", "in deep winter",
    "on a summer afternoon", "in autumn", "in a quiet forest", "by the sea", "in a busy city", "on a mountain top",
    "in a misty valley", "under cherry blossoms", "in the desert", "by candlelight", "in a snowstorm",
    "on a calm lake", "in a neon-lit night", "in a sunlit meadow",
]
STYLES = [
    "photograph", "oil painting", "watercolor painting", "digital illustration", "pencil sketch", "3d render",
    "ink drawing", "pastel drawing", "studio photograph", "film photograph", "gouache painting", "paper collage",
]
LIGHT = [
    "soft light", "golden hour light", "dramatic lighting", "backlit", "warm tones", "cool tones",
    "high contrast", "muted colors", "vivid colors", "cinematic lighting", "natural light", "long shadows",
]
QUALITY = ["", "highly detailed", "sharp focus", "wide angle", "close-up", "minimalist composition",
           "shallow depth of field", "intricate details"]
STYLE_FAMILIES = {
    "photo": ["a photo of {s} {w}, {l}", "a professional photograph of {s} {w}, {l}, 50mm lens"],
    "painting": ["an oil painting of {s} {w}, {l}, visible brush strokes",
                 "an impressionist painting of {s} {w}, {l}"],
    "anime": ["an anime illustration of {s} {w}, {l}, clean line art",
              "{s} {w} in the style of a hand-drawn animated film, {l}"],
    "concept-art": ["concept art of {s} {w}, {l}, matte painting",
                    "an epic fantasy concept art of {s} {w}, {l}"],
}

SURFACES = [
    "a wooden sign", "a neon sign", "a chalkboard", "a coffee cup", "a t-shirt", "a street banner", "a book cover",
    "a birthday cake", "a storefront window", "a movie poster", "a road sign", "a paper note", "a mug",
    "a billboard", "a tote bag", "a license plate", "a cereal box", "a shop awning", "a sticker", "a name tag",
]
OCR_TEMPLATES = [
    'a photo of {surface} that says "{text}"', '{surface} with the words "{text}" written on it',
    'a close-up of {surface} reading "{text}"', '{surface} showing the text "{text}", clear lettering',
    'an illustration of {surface} with "{text}" in bold letters',
]
WORDS_A = ["OPEN", "FRESH", "HAPPY", "GOOD", "BIG", "LITTLE", "BLUE", "GOLDEN", "QUIET", "WILD", "SUNNY", "NIGHT",
           "SWEET", "FAST", "GREEN", "LUCKY", "BRAVE", "COZY", "SILVER", "NORTH"]
WORDS_B = ["BAKERY", "COFFEE", "GARDEN", "MARKET", "BOOKS", "DREAMS", "CAFE", "STUDIO", "TRAIL", "HARBOR",
           "RECORDS", "PIZZA", "FLOWERS", "THEATER", "LIBRARY", "DINER", "ROAD", "MUSIC", "FARM", "BIKES"]
WORDS_SOLO = ["HELLO", "WELCOME", "SALE", "EXIT", "STOP", "THANK YOU", "BE KIND", "NO PARKING", "DRINK WATER",
              "STAY WILD", "LOVE", "DREAM BIG", "GO SLOW", "ON AIR", "PUSH", "PULL", "FRAGILE", "FOR RENT"]

OBJECTS = [  # (singular, plural)
    ("apple", "apples"), ("banana", "bananas"), ("bicycle", "bicycles"), ("bird", "birds"), ("book", "books"),
    ("bottle", "bottles"), ("bowl", "bowls"), ("car", "cars"), ("cat", "cats"), ("chair", "chairs"),
    ("clock", "clocks"), ("cup", "cups"), ("dog", "dogs"), ("horse", "horses"), ("kite", "kites"),
    ("laptop", "laptops"), ("orange", "oranges"), ("pillow", "pillows"), ("sheep", "sheep"), ("teddy bear",
    "teddy bears"), ("umbrella", "umbrellas"), ("vase", "vases"), ("suitcase", "suitcases"), ("backpack",
    "backpacks"), ("boat", "boats"), ("bench", "benches"), ("cake", "cakes"), ("lamp", "lamps"), ("guitar",
    "guitars"), ("hat", "hats"), ("candle", "candles"), ("balloon", "balloons"), ("shoe", "shoes"),
    ("toothbrush", "toothbrushes"), ("pizza", "pizzas"), ("cow", "cows"), ("duck", "ducks"), ("truck", "trucks"),
    ("carrot", "carrots"), ("plate", "plates"),
]
COLORS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white"]
NUMBERS = {2: "two", 3: "three", 4: "four", 5: "five"}
RELATIONS = {"left of": "left of", "right of": "right of", "above": "above", "below": "below"}

SIMPLE_ANIMALS = [
    "cat", "dog", "horse", "cow", "pig", "sheep", "goat", "chicken", "duck", "rabbit", "mouse", "hamster",
    "squirrel", "deer", "fox", "wolf", "bear", "lion", "tiger", "leopard", "elephant", "giraffe", "zebra",
    "monkey", "gorilla", "kangaroo", "koala", "panda", "camel", "hippo", "rhino", "crocodile", "turtle", "frog",
    "snake", "owl", "eagle", "parrot", "penguin", "flamingo", "dolphin", "whale", "shark", "octopus", "butterfly",
]
MORE_ANIMALS = [
    "alpaca", "llama", "badger", "beaver", "otter", "raccoon", "skunk", "porcupine", "hedgehog", "armadillo",
    "sloth", "anteater", "lemur", "orangutan", "chimpanzee", "baboon", "meerkat", "mongoose", "hyena", "jackal",
    "cheetah", "jaguar", "lynx", "bobcat", "cougar", "snow leopard", "red panda", "polar bear", "moose", "elk",
    "bison", "yak", "antelope", "gazelle", "ibex", "warthog", "tapir", "okapi", "walrus", "seal", "sea lion",
    "manatee", "narwhal", "orca", "seahorse", "jellyfish", "starfish", "crab", "lobster", "shrimp", "squid",
    "snail", "ladybug", "bee", "dragonfly", "grasshopper", "beetle", "ant", "spider", "scorpion", "lizard",
    "chameleon", "iguana", "gecko", "tortoise", "salamander", "toad", "goldfish", "clownfish", "pufferfish",
    "stingray", "swan", "goose", "pelican", "heron", "stork", "crane", "peacock", "toucan", "hummingbird",
    "woodpecker", "kingfisher", "robin", "sparrow", "crow", "raven", "magpie", "pigeon", "seagull", "albatross",
    "vulture", "falcon", "hawk", "ostrich", "emu", "kiwi bird", "puffin", "platypus", "wombat", "chinchilla",
]


# ----------------------------------------------------------------------------------------------- generators
def _draw(rng: random.Random, make: Callable[[random.Random], object], n: int, key=lambda x: x) -> list:
    """``n`` distinct items from ``make(rng)`` (distinct by ``key``), in draw order; fails if the space is small."""
    seen: set = set()
    out = []
    for _ in range(n * 200):
        item = make(rng)
        k = key(item)
        if k not in seen:
            seen.add(k)
            out.append(item)
            if len(out) == n:
                return out
    raise RuntimeError(f"template space too small for {n} distinct prompts (got {len(out)})")


def _split(items: list, n_test: int) -> tuple[list, list]:
    return items[n_test:], items[:n_test]


def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def aesthetic(rng: random.Random) -> str:
    q = rng.choice(QUALITY)
    parts = [f"{_a(rng.choice(STYLES))} of {rng.choice(SUBJECTS)} {rng.choice(SETTINGS)}", rng.choice(LIGHT)]
    return ", ".join(parts + ([q] if q else []))


def styled(rng: random.Random) -> str:
    family = rng.choice(sorted(STYLE_FAMILIES))
    return rng.choice(STYLE_FAMILIES[family]).format(s=rng.choice(SUBJECTS), w=rng.choice(SETTINGS),
                                                     l=rng.choice(LIGHT))


def ocr(rng: random.Random) -> dict:
    u = rng.random()
    text = (rng.choice(WORDS_SOLO) if u < 0.3 else f"{rng.choice(WORDS_A)} {rng.choice(WORDS_B)}" if u < 0.85
            else rng.choice(WORDS_B))
    surface = rng.choice(SURFACES)
    prompt = rng.choice(OCR_TEMPLATES).format(surface=surface, text=text)
    return {"prompt": prompt[0].upper() + prompt[1:], "text": text}


def geneval(rng: random.Random) -> dict:
    """One compositional prompt with its structure (GenEval-style tags)."""
    tag = rng.choice(["single_object", "two_object", "counting", "colors", "position", "color_attr"])
    (o1, p1), (o2, _) = rng.sample(OBJECTS, 2)
    if tag == "single_object":
        return {"prompt": f"a photo of {_a(o1)}", "tag": tag, "include": [{"class": o1, "count": 1}]}
    if tag == "two_object":
        return {"prompt": f"a photo of {_a(o1)} and {_a(o2)}", "tag": tag,
                "include": [{"class": o1, "count": 1}, {"class": o2, "count": 1}]}
    if tag == "counting":
        k = rng.choice(sorted(NUMBERS))
        return {"prompt": f"a photo of {NUMBERS[k]} {p1}", "tag": tag, "include": [{"class": o1, "count": k}]}
    if tag == "colors":
        c = rng.choice(COLORS)
        return {"prompt": f"a photo of {_a(c)} {o1}", "tag": tag,
                "include": [{"class": o1, "count": 1, "color": c}]}
    if tag == "position":
        rel = rng.choice(sorted(RELATIONS))
        return {"prompt": f"a photo of {_a(o1)} {rel} {_a(o2)}", "tag": tag,
                "include": [{"class": o2, "count": 1}, {"class": o1, "count": 1, "position": [rel, 0]}]}
    c1, c2 = rng.sample(COLORS, 2)
    return {"prompt": f"a photo of {_a(c1)} {o1} and {_a(c2)} {o2}", "tag": tag,
            "include": [{"class": o1, "count": 1, "color": c1}, {"class": o2, "count": 1, "color": c2}]}


def build(seed: int = 0) -> dict[str, str]:
    """``{file name: file text}`` of every prompt set (deterministic in ``seed``)."""
    files: dict[str, str] = {}

    def txt(lines: list[str]) -> str:
        return "".join(f"{line}\n" for line in lines)

    def jsonl(rows: list[dict]) -> str:
        return "".join(json.dumps(r, sort_keys=False) + "\n" for r in rows)

    for name, make, write, key in (("aesthetic", aesthetic, txt, None), ("styles", styled, txt, None),
                                   ("ocr", ocr, jsonl, lambda r: r["prompt"]),
                                   ("geneval", geneval, jsonl, lambda r: r["prompt"])):
        rng = random.Random(f"{seed}:{name}")  # one stream per set: adding a set never changes the others
        items = _draw(rng, make, N_TRAIN + N_TEST, key or (lambda x: x))
        train, test = _split(items, N_TEST)
        files[f"{name}_train.{'txt' if write is txt else 'jsonl'}"] = write(train)
        files[f"{name}_test.{'txt' if write is txt else 'jsonl'}"] = write(test)
    files["animals_simple.txt"] = txt(SIMPLE_ANIMALS)
    rng = random.Random(f"{seed}:animals")
    animals = sorted(set(SIMPLE_ANIMALS + MORE_ANIMALS))
    rng.shuffle(animals)
    files["animals_train.txt"], files["animals_test.txt"] = txt(animals[24:]), txt(animals[:24])
    return files


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=OUT, help="output folder (default recipes/prompts)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check", action="store_true", help="compare with the files in --out instead of writing")
    args = p.parse_args(argv)
    files = build(args.seed)
    if args.check:
        stale = [n for n, text in files.items()
                 if not (args.out / n).is_file() or (args.out / n).read_text(encoding="utf-8") != text]
        for n in stale:
            print(f"stale: {args.out / n} (rerun scripts/make_prompts.py)", file=sys.stderr)
        return 1 if stale else 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (args.out / name).write_text(text, encoding="utf-8")
        print(f"{args.out / name}: {text.count(chr(10))} prompts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
