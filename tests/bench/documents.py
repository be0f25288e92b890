"""The search scenario's corpus and queries: generated, deterministic, realistic enough.

Every run builds the same documents from the same seed, so figures from two runs search the same
text. Words are pseudo-words made of syllables (a vocabulary of 3,000), drawn with Zipf's law (the
word of rank r about 1/r as often as the commonest), as the words of real text are: a few words
match most documents, most words match few. Each document has a title, a body of 40–120 words, a
category, one to four tags, a price as a decimal string (some none) and a publication time
between 2015 and 2026.

The queries are the kinds a search box gets (level04.md §15): plain words (all must match), an
exact phrase of two common words, a prefix, a word with filters (category, price range), and a
word with a tag, a date range and the newest first. Each is named, so the report gives its own
figures.
"""

import bisect
import itertools
import json
import random
import time
from collections.abc import Iterator
from urllib.parse import urlencode

SEED = 20261124
VOCABULARY_SIZE = 3000
CATEGORIES = ["books", "electronics", "garden", "kitchen", "music", "outdoors", "office", "toys",
              "travel", "health", "sports", "fashion"]
ONSETS = ["b", "br", "c", "ch", "d", "f", "g", "gr", "h", "k", "l", "m", "n", "p", "pl", "r", "s",
          "sh", "st", "t", "tr", "v", "w", "z"]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "ou"]
CODAS = ["", "", "", "n", "r", "s", "l", "m", "st", "nd"]
EPOCH_2015 = 1420070400  # 2015-01-01T00:00:00Z
SPAN_S = 12 * 365 * 86400  # to the end of 2026


def vocabulary() -> list[str]:
    """VOCABULARY_SIZE distinct pseudo-words, commonest first (the order is their Zipf rank)."""
    rng = random.Random(SEED)
    words: dict[str, None] = {}
    while len(words) < VOCABULARY_SIZE:
        words["".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS)
                      for _ in range(rng.choices((1, 2, 3), (3, 5, 2))[0]))] = None
    return list(words)


WORDS = vocabulary()
TAGS = WORDS[200:260]  # sixty tags, themselves words of the text
CUMULATIVE_ZIPF = list(itertools.accumulate(1 / rank for rank in range(1, VOCABULARY_SIZE + 1)))


def zipf_words(rng: random.Random, count: int) -> list[str]:
    total = CUMULATIVE_ZIPF[-1]
    return [WORDS[bisect.bisect(CUMULATIVE_ZIPF, rng.random() * total)] for _ in range(count)]


def generate_documents(count: int) -> Iterator[dict]:
    """`count` documents as POST /documents takes them, the same ones on every run."""
    rng = random.Random(SEED)
    for _ in range(count):
        published = EPOCH_2015 + rng.randrange(SPAN_S)
        yield {
            "title": " ".join(zipf_words(rng, rng.randint(3, 8))).capitalize(),
            "body": " ".join(zipf_words(rng, rng.randint(40, 120))) + ".",
            "category": rng.choices(CATEGORIES, weights=range(len(CATEGORIES), 0, -1))[0],
            "tags": rng.sample(TAGS, rng.randint(1, 4)),
            "price": None if rng.random() < 0.1 else f"{rng.lognormvariate(3.5, 1.0):.2f}",
            "published_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(published)),
        }


def ndjson_batches(count: int, lines_per_batch: int) -> Iterator[bytes]:
    """The documents as NDJSON bodies of at most lines_per_batch lines each."""
    documents = generate_documents(count)
    while batch := list(itertools.islice(documents, lines_per_batch)):
        yield "".join(json.dumps(document) + "\n" for document in batch).encode()


def search_queries() -> dict[str, str]:
    """Named GET /search targets (path and query string)."""
    def target(**params: str) -> str:
        return "/search?" + urlencode(params)

    return {
        "words": target(q=f"{WORDS[40]} {WORDS[90]}"),
        "phrase": target(q=f'"{WORDS[4]} {WORDS[9]}"'),
        "prefix": target(q=WORDS[30][:3] + "*"),
        "filter": target(q=WORDS[60], category=CATEGORIES[2], min_price="10.00", max_price="100.00"),
        "tag, dates, newest": target(q=WORDS[120], tag=TAGS[3], **{"from": "2020-01-01", "to": "2023-12-31"},
                                     sort="-published_at"),
    }
