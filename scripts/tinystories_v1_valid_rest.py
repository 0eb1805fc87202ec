"""Write the V1 validation text that follows the held-out text: extra training text from the held-out distribution.

    python scripts/tinystories_v1_valid_rest.py ../shared/data/tinystories/v1_valid_head.txt \
        assets/tinystories/eval.txt assets/tinystories/train_v1_valid.txt

``eval.txt`` is the first 300,094 characters of the source; this takes the text after it, from the first story
that starts after the cut ("Once upon a time" paragraph), so no story is shared with the held-out text, drops
the last paragraph (the source is cut mid-story), and repairs the source's mojibake (UTF-8 quotes and dashes
read as cp1252; the closing quote's third byte was lost) to the intended characters. It checks that the
held-out text is a prefix of the source and that no held-out paragraph reappears.
"""

import sys
from pathlib import Path

# The SMALL TILDE in the left quote's mojibake is the cp1252 reading of byte 0x98, not a typo for "~".
MOJIBAKE = [("â€œ", "“"), ("â€™", "’"), ("â€˜", "‘"), ("â€“", "–"), ("â€”", "—"), ("â€Š", ""), ("â€", "”")]  # noqa: RUF001


def main(source: str, heldout: str, out: str) -> None:
    raw = Path(source).read_text(encoding="utf-8")
    held = Path(heldout).read_text(encoding="utf-8")
    if not raw.startswith(held):
        sys.exit(f"{heldout} is not the start of {source}")
    rest = raw[raw.index("\n\nOnce upon a time", len(held)) + 2 :]
    for bad, good in MOJIBAKE:
        rest = rest.replace(bad, good)
    rest = rest[: rest.rstrip().rindex("\n\n")].rstrip() + "\n"
    held_paragraphs = {p.strip() for p in held.split("\n\n") if len(p.strip()) > 40}
    shared = [p for p in rest.split("\n\n") if p.strip() in held_paragraphs]
    if shared:
        sys.exit(f"{len(shared)} held-out paragraphs reappear after the cut, e.g. {shared[0][:80]!r}")
    with open(out, "w", encoding="utf-8") as f:
        f.write(rest)
    print(f"wrote {len(rest):,} characters ({rest.count(chr(10) * 2) + 1:,} paragraphs) to {out}")


if __name__ == "__main__":
    main(*sys.argv[1:4])
