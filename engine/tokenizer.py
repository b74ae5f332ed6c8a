"""Tokenizer from the model (HF directory or GGUF) and incremental detokenization."""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.model_source import ModelSource

PROMPT_CONTEXT_TOKENS = 5


def cache_dir() -> Path:
    return Path(os.environ.get("PDMESH_CACHE_DIR", Path.home() / ".cache" / "pdmesh"))


def load_tokenizer(source: ModelSource) -> Any:
    """An ``AutoTokenizer``. Converting a GGUF vocabulary takes seconds, so the converted
    tokenizer is saved once under the pdmesh cache directory, keyed by the file's identity."""
    from transformers import AutoTokenizer

    if not source.is_gguf:
        return AutoTokenizer.from_pretrained(str(source.path))
    stat = source.path.stat()
    key = hashlib.sha256(f"{source.path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    saved = cache_dir() / "tokenizers" / key.hexdigest()[:16]
    if (saved / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(str(saved))
    tokenizer = AutoTokenizer.from_pretrained(str(source.directory), gguf_file=source.path.name)
    with contextlib.suppress(OSError):  # a read-only home only costs the conversion next time
        tokenizer.save_pretrained(str(saved))
    return tokenizer


def encode_prompt(tokenizer: Any, prompt: str | list[dict[str, str]]) -> list[int]:
    """Plain text is tokenized as is; a list of chat messages goes through the chat template
    with the assistant turn opened."""
    if isinstance(prompt, str):
        return list(tokenizer.encode(prompt))
    ids = tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)


@dataclass
class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    Byte-level BPE splits one character over several tokens; decoding a token alone would
    emit U+FFFD. A fast (Rust) tokenizer streams through ``tokenizers``' ``DecodeStream``
    (one native call per token, no text is decoded twice); other tokenizers decode a short
    window ending at the new token and the same window without it. Either way nothing is
    emitted while the text ends in an incomplete character, and concatenated deltas equal
    ``decode(all ids)``.
    """

    tokenizer: Any
    skip_special_tokens: bool = True
    token_ids: list[int] = field(default_factory=list)
    #: Start of the decoding window: tokens before it are already final text.
    prefix_offset: int = 0
    #: Tokens before this index have been emitted as text.
    read_offset: int = 0
    _stream: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        context = self.token_ids[self.prefix_offset : self.read_offset]
        # A context ending inside a character would come out again as the stream's first
        # text: such (rare) requests take the windowed path.
        if backend is not None and not self._decode(context).endswith("\ufffd"):
            from tokenizers.decoders import DecodeStream

            self._stream = DecodeStream(ids=context, skip_special_tokens=self.skip_special_tokens)
            self._backend = backend

    @classmethod
    def after_prompt(
        cls, tokenizer: Any, prompt_token_ids: list[int], skip_special_tokens: bool = True
    ) -> IncrementalDetokenizer:
        """Starts with the prompt's last few tokens as context, so the first output token
        decodes with the spacing it has after the prompt (SentencePiece drops a leading
        space on a token decoded alone)."""
        context = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        return cls(tokenizer, skip_special_tokens, context, 0, len(context))

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens))

    def add(self, new_token_ids: list[int]) -> str:
        if self._stream is None:
            return self._add_windowed(new_token_ids)
        pieces = []
        for token_id in new_token_ids:
            self.token_ids.append(token_id)
            piece = self._stream.step(self._backend, token_id)
            if piece:  # the window flush() would decode starts after the last emitted text
                pieces.append(piece)
                self.prefix_offset = self.read_offset
                self.read_offset = len(self.token_ids)
        return "".join(pieces)

    def _add_windowed(self, new_token_ids: list[int]) -> str:
        self.token_ids.extend(new_token_ids)
        prefix_text = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        full_text = self._decode(self.token_ids[self.prefix_offset :])
        if full_text.endswith("\ufffd") or len(full_text) <= len(prefix_text):
            return ""  # an incomplete character, or a token that renders as nothing yet
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.token_ids)
        return full_text[len(prefix_text) :]

    def flush(self) -> str:
        """Whatever is still held back at the end (e.g. a truncated multi-byte character)."""
        if self.read_offset == len(self.token_ids):
            return ""
        prefix_text = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        full_text = self._decode(self.token_ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.token_ids)
        return full_text[len(prefix_text) :]
