"""Write the TinyStories V2 (GPT-4) training sample used by the README's development runs 1-11.

    python scripts/tinystories_v2_sample.py ../shared/data/tinystories/v2_gpt4_train_head10k_lines.txt /tmp/v2.jsonl
    python train.py recipe=tiny data.train=/tmp/v2.jsonl ...

The first 1,200 complete stories of the file, one ``{"text": ...}`` per line; with a third argument
``all``, every complete story (1,727: how ``assets/tinystories/train_v2.jsonl`` was made).
"""

import json
import re
import sys
from pathlib import Path


def main(source: str, out: str, n: int | None = 1200) -> None:
    text = Path(source).read_text(encoding="utf-8")
    stories = [re.sub(r"[ \t]+\n", "\n", s.strip()) for s in text.split("<|endoftext|>")]
    stories = [s for s in stories if s][:-1]  # the last story is cut off at the file's end
    stories = stories[:n]
    with open(out, "w", encoding="utf-8") as f:
        for story in stories:
            f.write(json.dumps({"text": story}, ensure_ascii=False) + "\n")
    print(f"wrote {len(stories)} stories to {out}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], None if sys.argv[3:] == ["all"] else 1200)
