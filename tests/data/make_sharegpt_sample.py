"""Write tests/data/sharegpt_sample.json: a small ShareGPT-format file made from the repo's docs.

vLLM's `--dataset-name sharegpt` reads a JSON list of {"id", "conversations": [{"from": "human",
"value": ...}, {"from": "gpt", "value": ...}]}. The load-test tests need one that is local and
small, so this takes consecutive prose paragraphs of docs/*.md: a paragraph (with its section
heading) is the human turn and the next paragraph the reply. Run from the repository root:

    python tests/data/make_sharegpt_sample.py
"""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = ("api.md", "engine.md", "kernels.md", "training.md", "loadtest.md")
MAX_ENTRIES = 24
MAX_REPLY_CHARS = 450  # replies of about 100 tokens: a run of 10 requests takes seconds on a CPU


def prose_paragraphs(text: str) -> list[tuple[str, str]]:
    """(section heading, paragraph) of every plain paragraph: no code, tables, lists or headings."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    out, heading = [], ""
    for block in re.split(r"\n\s*\n", text):
        block = block.strip()
        if block.startswith("#"):
            heading = block.lstrip("#").strip()
        elif block and not block.startswith(("|", "-", "*", ">", "1.", "<", "!")) and len(block) > 120:
            out.append((heading, " ".join(block.split())))
    return out


def main() -> None:
    entries = []
    for name in DOCS:
        paragraphs = prose_paragraphs((ROOT / "docs" / name).read_text())
        for (heading, first), (_, second) in zip(paragraphs[::2], paragraphs[1::2]):
            if len(second) > MAX_REPLY_CHARS:
                continue
            human = f"From the elas-serve docs ({name}, {heading}): {first} What comes next?"
            entries.append({"id": f"{name}-{len(entries)}", "conversations": [
                {"from": "human", "value": human}, {"from": "gpt", "value": second}]})
    entries = entries[:MAX_ENTRIES]
    out = ROOT / "tests" / "data" / "sharegpt_sample.json"
    out.write_text(json.dumps(entries, indent=1, ensure_ascii=False) + "\n")
    print(f"{out}: {len(entries)} conversations")


if __name__ == "__main__":
    main()
