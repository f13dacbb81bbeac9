"""Tokenizer: a thin wrapper over HF `tokenizers`, plus incremental detokenization.

Loads `tokenizer.json` from a checkpoint directory (or any path given with `--tokenizer`) and, if
present, `tokenizer_config.json` for the EOS token and chat template. Nothing is downloaded.

`IncrementalDetokenizer` turns a growing list of token ids into text deltas that are safe to show
(stream, match stop strings): it decodes a small window with the previous tokens as context (so
leading spaces of SentencePiece/byte-level pieces come out right) and holds text back while the
window ends inside a multi-byte character (the decoder then yields U+FFFD).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from elas_serve.models.config import CheckpointError

EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")
# NOTE: vLLM starts detokenization this many tokens before the end of the prompt.
PROMPT_CONTEXT_TOKENS = 5


class Tokenizer:
    def __init__(self, tok: HFTokenizer, eos_token_ids: list[int] | None = None,
                 chat_template: str | None = None, name: str = "tokenizer"):
        self.tok = tok
        self.name = name
        self.chat_template = chat_template
        self.eos_token_ids = list(eos_token_ids) if eos_token_ids else [
            i for t in EOS_CANDIDATES if (i := tok.token_to_id(t)) is not None][:1]

    @classmethod
    def from_path(cls, path: str | Path, eos_token_ids: list[int] | None = None) -> "Tokenizer":
        """From a `tokenizer.json` file or a directory holding one."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.exists():
            raise CheckpointError(f"{file}: no such file (give the checkpoint a tokenizer.json, "
                                  f"or pass --tokenizer PATH)")
        try:
            tok = HFTokenizer.from_file(str(file))
        except Exception as e:
            raise CheckpointError(f"{file}: cannot load tokenizer ({e})") from None
        chat_template, eos = None, list(eos_token_ids or [])
        cfg_file = file.parent / "tokenizer_config.json"
        if cfg_file.exists():
            try:
                cfg = json.loads(cfg_file.read_text())
            except (OSError, ValueError) as e:
                raise CheckpointError(f"{cfg_file}: cannot read ({e})") from None
            chat_template = cfg.get("chat_template") if isinstance(cfg.get("chat_template"), str) else None
            eos_tok = cfg.get("eos_token")
            eos_tok = eos_tok.get("content") if isinstance(eos_tok, dict) else eos_tok
            if not eos and isinstance(eos_tok, str) and tok.token_to_id(eos_tok) is not None:
                eos = [tok.token_to_id(eos_tok)]
        return cls(tok, eos, chat_template, name=str(file))

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token(self) -> str | None:
        return self.tok.id_to_token(self.eos_token_ids[0]) if self.eos_token_ids else None

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """An upper bound on the UTF-8 bytes of text one token stands for (its vocabulary entry's
        bytes): a text of `b` bytes has at least `b / max_token_bytes` tokens."""
        return max((len(t.encode("utf-8")) for t in self.tok.get_vocab(with_added_tokens=True)), default=1)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.encode_batch([text], add_special_tokens)[0]

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        """NOTE: `encode_batch` releases the GIL while it tokenizes (`encode` does not), so a long
        text tokenized on a worker thread leaves the server's event loop free."""
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self.tok.id_to_token(token_id)


class IncrementalDetokenizer:
    """Text deltas of generated tokens, with the prompt's last tokens as decoding context."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int] | None = None,
                 skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(prompt_ids or [])
        self.read_offset = len(self.ids)  # tokens before this are already in `text`
        self.prefix_offset = max(len(self.ids) - PROMPT_CONTEXT_TOKENS, 0)
        self.text = ""  # generated text released so far

    def _decode(self, start: int, end: int | None = None) -> str:
        return self.tokenizer.decode(self.ids[start:end], self.skip_special_tokens)

    def push(self, token_ids: list[int]) -> str:
        """Append tokens; return the newly releasable text (possibly "")."""
        self.ids.extend(token_ids)
        prefix_text = self._decode(self.prefix_offset, self.read_offset)
        new_text = self._decode(self.prefix_offset)
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""  # nothing new, or the window ends inside a multi-byte character
        delta = new_text[len(prefix_text):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """At the end of generation: release whatever is held back (even a partial character)."""
        prefix_text = self._decode(self.prefix_offset, self.read_offset)
        delta = self._decode(self.prefix_offset)[len(prefix_text):]
        self.prefix_offset = self.read_offset = len(self.ids)
        self.text += delta
        return delta
