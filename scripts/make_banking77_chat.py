"""Derive data/banking77-chat/ (prompt/completion JSONL) from data/banking77/: the prompt
is the customer message, the completion the intent in words ("card_arrival" ->
"card arrival"). Rows and their order are unchanged; run from the repository root."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

SOURCE = Path("data/banking77")
TARGET = Path("data/banking77-chat")


def intent_words(label: str) -> str:
    """The intent as words: lower case, underscores to spaces, stray punctuation dropped."""
    return " ".join(label.replace("_", " ").replace("?", " ").lower().split())


def main() -> None:
    TARGET.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        rows = [
            json.loads(line) for line in (SOURCE / f"{split}.jsonl").read_text(encoding="utf-8").splitlines() if line
        ]
        with (TARGET / f"{split}.jsonl").open("w", encoding="utf-8") as out:
            for row in rows:
                out.write(
                    json.dumps(
                        {"prompt": row["text"].strip(), "completion": intent_words(row["label"])}, ensure_ascii=False
                    )
                    + "\n"
                )
        print(f"{TARGET / split}.jsonl: {len(rows)} rows")
    labels = json.loads((SOURCE / "labels.json").read_text(encoding="utf-8"))
    (TARGET / "intents.json").write_text(
        json.dumps([intent_words(x) for x in labels], indent=0) + "\n", encoding="utf-8"
    )
    shutil.copy2(SOURCE / "LICENSE-CC-BY-4.0.md", TARGET / "LICENSE-CC-BY-4.0.md")


if __name__ == "__main__":
    main()
