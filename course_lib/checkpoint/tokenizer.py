"""Text in, text out: token ids, special tokens, the chat template, and streaming detokenization.

**Byte-level BPE**, the tokenizer of GPT-2, Llama 3, Qwen and SmolLM2. Text is first turned into UTF-8
bytes, and each of the 256 byte values is given a printable stand-in character (``" "`` becomes ``"Ġ"``,
``"\\n"`` becomes ``"Ċ"``, printable ASCII stays itself), so every string, in any script, is spelled with a
base alphabet of 256 symbols and no text is ever "unknown". A *pre-tokenizer* first cuts the text into
words with a regular expression (a leading space stays with its word, digits and punctuation go apart),
so that no token spans two words. Inside each word, BPE starts from single byte-symbols and applies the
*merges*: an ordered list of pairs learned in training ("Ġ t", "h e", "Ġt he", ...). Repeatedly, the
adjacent pair with the best rank (the earliest in the list) is fused into one symbol, until no adjacent
pair is in the list; each final symbol is a vocabulary entry, whose index is the token id. Decoding is
the reverse: ids to symbols, symbols to bytes, bytes to UTF-8 text.

**Special tokens** such as ``<|im_start|>`` are not spelled by merges: they are matched whole in the text
before BPE runs, so a chat prompt's markers become single ids the model was trained on.

**Chat templates.** An instruct model was fine-tuned on conversations laid out in one exact format
(SmolLM2: ``<|im_start|>user\\n...<|im_end|>\\n``); a prompt in any other layout is text it has never
seen. The checkpoint ships that layout as a Jinja template, and ``apply_chat_template`` renders it the
way ``transformers`` does, so the engine's prompt is byte for byte the one the model was trained on.

**Streaming.** One token can hold half of a character: an emoji is four UTF-8 bytes and byte-level BPE
may give them to two tokens. Decoding only the first token yields an incomplete byte sequence, which a
decoder renders as U+FFFD. ``IncrementalDetokenizer`` holds such bytes back until a later token completes
the character, so a streamed reply never shows a replacement character that the full text does not have.

Two sources build the same ``Tokenizer``: a Hugging Face checkpoint folder (``tokenizer.json``, read by the
``tokenizers`` library) and the metadata of a GGUF file (vocabulary, merges and token types as lists,
from which this module rebuilds the ``tokenizers`` pipeline).
"""

from __future__ import annotations

import json
import operator
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
GENERATION_CONFIG_FILE = "generation_config.json"

# GGUF's token types (llama.cpp's llama_token_type): the ones that are not spelled by the merges.
GGUF_CONTROL = 3  # special tokens such as <|im_start|>: matched whole, dropped by skip_special_tokens
GGUF_USER_DEFINED = 4  # added words: matched whole, but ordinary text when decoding


def _digits_then_gpt2() -> pre_tokenizers.PreTokenizer:
    """Every number character alone, then GPT-2's regex: what Hugging Face's SmolLM2 tokenizer.json does."""
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )


def _gpt2() -> pre_tokenizers.PreTokenizer:
    """GPT-2's regex: contractions, letters, numbers and punctuation apart, a leading space kept with its word."""
    return pre_tokenizers.ByteLevel(add_prefix_space=False)


# GGUF's tokenizer.ggml.pre names the pre-tokenizer regexes llama.cpp applies before BPE (llama-vocab.cpp).
# "smollm": first r"\p{N}" (each number character alone), then GPT-2's regex; "gpt2": GPT-2's regex alone.
# A name not listed here is refused: a wrong pre-tokenizer gives plausible but wrong ids (digits grouped
# differently, say), which a model reads as subtly different text.
GGUF_PRE_TOKENIZERS = {"smollm": _digits_then_gpt2, "gpt2": _gpt2}


class Tokenizer:
    """Text <-> token ids, special tokens, and the model's chat template.

    Build one with ``from_pretrained_dir`` (a Hugging Face checkpoint folder) or ``from_gguf_metadata``
    (a GGUF file's key/value fields). The constructor takes a ready ``tokenizers.Tokenizer`` and the facts
    around it:

    - ``vocab_size``: ids run from 0 to ``vocab_size - 1``, added tokens included;
    - ``bos_token_id``: the beginning-of-sequence token, or None;
    - ``add_bos_token``: whether ``encode`` puts BOS first (SmolLM2: no, its chat template writes its markers);
    - ``eos_token_ids``: every id that ends a reply, for the engine's stop check;
    - ``chat_template``: the Jinja source of the chat format, or None for a base model.
    """

    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        bos_token_id: int | None,
        eos_token_ids: Iterable[int],
        add_bos_token: bool,
        chat_template: str | None,
        source: str,
    ) -> None:
        self._backend = backend
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.source = source
        self.bos_token_id = None if bos_token_id is None else self._checked_id(bos_token_id, "bos_token_id")
        # dict.fromkeys: unique ids, first mention first
        self.eos_token_ids: tuple[int, ...] = tuple(
            dict.fromkeys(self._checked_id(token_id, "eos_token_id") for token_id in eos_token_ids)
        )
        if add_bos_token and self.bos_token_id is None:
            raise ValueError(f"{source}: the tokenizer should add a BOS token but names none")
        self.add_bos_token = add_bos_token
        self.chat_template = chat_template or None
        self._template = None if self.chat_template is None else _compile_template(self.chat_template, source)

    # ------------------------------------------------------------------ building

    @classmethod
    def from_pretrained_dir(cls, directory: str | Path) -> Tokenizer:
        """Read a Hugging Face checkpoint folder.

        ``tokenizer.json`` (required) is the whole tokenizers pipeline. Optional: ``tokenizer_config.json``
        (``bos_token``, ``eos_token``, ``add_bos_token``, ``chat_template``), ``chat_template.jinja`` (where
        newer ``transformers`` saves the template) and ``generation_config.json`` (``eos_token_id``, an int
        or a list: every id that ends a reply). Without ``add_bos_token`` in the config, BOS is added when
        the pipeline's own post-processor puts it first (Llama 3 does), as ``transformers`` would.
        """
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"no checkpoint folder at {directory}")
        tokenizer_file = directory / TOKENIZER_FILE
        if not tokenizer_file.is_file():
            raise FileNotFoundError(
                f"{directory} has no {TOKENIZER_FILE}; a Hugging Face checkpoint folder holds {TOKENIZER_FILE} "
                f"(the vocabulary and the tokenization pipeline), and optionally {TOKENIZER_CONFIG_FILE} and "
                f"{GENERATION_CONFIG_FILE}, beside config.json and the weights"
            )
        backend = BackendTokenizer.from_file(str(tokenizer_file))
        config = _read_json(directory / TOKENIZER_CONFIG_FILE)
        generation = _read_json(directory / GENERATION_CONFIG_FILE)

        def token_id(key: str) -> int | None:
            token = config.get(key)
            if isinstance(token, dict):  # an AddedToken written out: {"content": "<s>", ...}
                token = token.get("content")
            if token is None:
                return None
            found = backend.token_to_id(token)
            if found is None:
                raise ValueError(f"{directory / TOKENIZER_CONFIG_FILE}: {key} {token!r} is not in the vocabulary")
            return found

        bos_token_id = token_id("bos_token")
        eos_token_ids = [token_id("eos_token")] + _id_list(
            generation.get("eos_token_id"), f"{directory / GENERATION_CONFIG_FILE}: eos_token_id"
        )
        add_bos_token = config.get("add_bos_token")
        if add_bos_token is None:
            add_bos_token = bos_token_id is not None and backend.encode("").ids[:1] == [bos_token_id]
        template_file = directory / CHAT_TEMPLATE_FILE
        template = template_file.read_text() if template_file.is_file() else config.get("chat_template")
        return cls(
            backend,
            bos_token_id=bos_token_id,
            eos_token_ids=[token for token in eos_token_ids if token is not None],
            add_bos_token=bool(add_bos_token),
            chat_template=_one_template(template, str(directory)),
            source=str(directory),
        )

    @classmethod
    def from_gguf_metadata(cls, metadata: dict[str, Any], source: str = "GGUF metadata") -> Tokenizer:
        """Rebuild the tokenizer that a GGUF file's ``tokenizer.*`` fields describe.

        Only byte-level BPE (``tokenizer.ggml.model == "gpt2"``) with a pre-tokenizer of
        ``GGUF_PRE_TOKENIZERS`` is built; anything else is refused by name rather than approximated.
        Control and user-defined tokens become added tokens, matched whole in the text. Every
        end-of-generation id the file names (``eos``, ``eot``, ``eom``) goes into ``eos_token_ids``; llama.cpp
        also stops on tokens it recognises by their name (SmolLM2's ``<|endoftext|>``), a guess not made here.
        ``tokenizer.ggml.add_bos_token`` absent means no BOS, as GPT-2-style tokenizers add none.
        """

        def field(key: str, default: Any = None) -> Any:
            return metadata.get(f"tokenizer.{key}", default)

        model = field("ggml.model")
        if model is None:
            raise ValueError(f"{source} has no tokenizer.ggml.model: the file carries no tokenizer")
        if model != "gpt2":
            raise ValueError(
                f"{source}: tokenizer.ggml.model {model!r} is not supported; this course builds byte-level BPE "
                "('gpt2', the tokenizer of SmolLM2, GPT-2 and Llama 3) only"
            )
        pre = field("ggml.pre", "default")
        if pre not in GGUF_PRE_TOKENIZERS:
            raise ValueError(
                f"{source}: pre-tokenizer tokenizer.ggml.pre {pre!r} is not implemented "
                f"(known: {', '.join(sorted(GGUF_PRE_TOKENIZERS))}); refusing to guess how it splits text"
            )
        tokens, merges = field("ggml.tokens"), field("ggml.merges")
        if not tokens or merges is None:
            raise ValueError(f"{source}: a BPE tokenizer needs tokenizer.ggml.tokens and tokenizer.ggml.merges")
        token_types = field("ggml.token_type", [1] * len(tokens))
        if len(token_types) != len(tokens):
            raise ValueError(f"{source}: {len(token_types)} token types for {len(tokens)} tokens")

        vocab = {token: index for index, token in enumerate(tokens)}
        if len(vocab) != len(tokens):
            raise ValueError(f"{source}: tokenizer.ggml.tokens has duplicates, so ids would not round-trip")
        pairs = []
        for merge in merges:
            pair = tuple(merge.split(" "))
            if len(pair) != 2:
                raise ValueError(f"{source}: merge {merge!r} is not two symbols separated by one space")
            pairs.append(pair)
        backend = BackendTokenizer(models.BPE(vocab, pairs, fuse_unk=False, byte_fallback=False))
        backend.pre_tokenizer = GGUF_PRE_TOKENIZERS[pre]()
        backend.decoder = decoders.ByteLevel()
        backend.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                            for i, kind in enumerate(token_types) if kind == GGUF_USER_DEFINED])
        backend.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                    for i, kind in enumerate(token_types) if kind == GGUF_CONTROL])

        eos_keys = ("ggml.eos_token_id", "ggml.eot_token_id", "ggml.eom_token_id")
        return cls(
            backend,
            bos_token_id=field("ggml.bos_token_id"),
            eos_token_ids=[field(key) for key in eos_keys if field(key) is not None],
            add_bos_token=bool(field("ggml.add_bos_token", False)),
            chat_template=field("chat_template"),
            source=source,
        )

    # ------------------------------------------------------------------ ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The token ids of ``text``; special tokens written in it (``<|im_start|>``) become their single ids.

        ``add_special_tokens`` prepends BOS where the model's tokenizer asks for it (``add_bos_token``).
        Matching markers in the text is what a rendered chat prompt needs, and what ``transformers`` does;
        it also means text that spells ``<|im_end|>`` gets the real marker, a known route for forging chat turns.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        ids = self._backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos_token:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, token_ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """The text of ``token_ids``; ``skip_special_tokens`` drops control tokens such as ``<|im_end|>``.

        Bytes that do not form valid UTF-8 (a character cut off at the end) come out as U+FFFD.
        """
        ids = [self._checked_id(token_id, "token id") for token_id in token_ids]
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """The id of one vocabulary entry, spelled as stored (byte-level: ``"Ġthe"``), or None."""
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str:
        """The vocabulary entry of one id, as stored (byte-level: ``"Ġthe"`` for ``" the"``)."""
        return self._backend.id_to_token(self._checked_id(token_id, "token id"))

    def detokenizer(self, skip_special_tokens: bool = True) -> IncrementalDetokenizer:
        """A fresh streaming decoder. By default it hides special tokens, as vLLM's output text does: a chat
        reader wants the reply, not the ``<|im_end|>`` that ended it (which ``eos_token_ids`` already tells)."""
        return IncrementalDetokenizer(self, skip_special_tokens=skip_special_tokens)

    def _checked_id(self, token_id: Any, what: str) -> int:
        """``token_id`` as an int, or an error: the backend would skip an unknown id without a word."""
        try:
            value = operator.index(token_id)  # Python and NumPy integers; not floats, not strings
        except TypeError:
            raise TypeError(f"{what} must be an integer, got {token_id!r}") from None
        if not 0 <= value < self.vocab_size:
            raise ValueError(f"{what} {value} is outside the vocabulary [0, {self.vocab_size})")
        return value

    # ------------------------------------------------------------------ chat

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render a conversation into the prompt text the model was fine-tuned on.

        ``messages`` is a list of ``{"role": ..., "content": ...}``. ``add_generation_prompt`` ends the prompt
        with the opening of an assistant turn, so the model's next tokens are the reply. Rendered as
        ``transformers`` does: a sandboxed Jinja environment with ``trim_blocks`` and ``lstrip_blocks``, the
        variables ``messages``, ``add_generation_prompt``, ``bos_token`` and ``eos_token``, and the helpers
        ``raise_exception`` (which templates use to reject a conversation: a ``ValueError`` here),
        ``strftime_now`` and a ``tojson`` that leaves non-ASCII text as it is. Encode the result with
        ``add_special_tokens=False`` when the template writes the BOS itself.
        """
        if self._template is None:
            raise ValueError(
                f"{self.source} has no chat template, so it cannot format a conversation; "
                "encode a plain prompt instead (a base model is not trained on chat turns)"
            )
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise TypeError('messages must be a list of dicts like {"role": "user", "content": "Hi"}')
        special = {"bos_token": self.bos_token_id, "eos_token": self.eos_token_ids[0] if self.eos_token_ids else None}
        strings = {name: self._backend.id_to_token(i) for name, i in special.items() if i is not None}
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, **strings)

    def __repr__(self) -> str:
        return (f"Tokenizer({self.source}: vocab_size={self.vocab_size}, bos={self.bos_token_id}, "
                f"eos={self.eos_token_ids}, chat_template={'yes' if self.chat_template else 'no'})")


class IncrementalDetokenizer:
    """Turns a stream of token ids into text pieces without breaking UTF-8 between tokens.

    The trick (the one vLLM and TGI use) works for any tokenizer: decode a short window of recent tokens
    twice, without and with the new token, and hand out the difference. Decoding a window instead of
    one token keeps what depends on neighbours right (a SentencePiece decoder drops the leading space of
    the first token it sees; here that token is in both decodes, so the difference keeps its space). If
    the window's text ends in U+FFFD, the last bytes are an incomplete character: hand out nothing and
    wait for the next token. The window then restarts where the last piece ended, so it stays a few
    tokens long. Joining every ``push`` and the final ``flush`` gives ``decode(all ids)``.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._window: list[int] = []  # the tokens of the last piece handed out, then the ones not yet shown
        self._shown = 0  # how many of the window's tokens are already in the text handed out

    def push(self, token_id: int) -> str:
        """The new text ``token_id`` completes; "" while a multi-byte character is still incomplete."""
        window = [*self._window, token_id]
        text = self._tokenizer.decode(window, skip_special_tokens=self.skip_special_tokens)  # checks the id
        self._window = window
        if text.endswith("\ufffd"):
            return ""
        return self._advance(text)

    def flush(self) -> str:
        """At the end of the stream: whatever is still held back, U+FFFD for bytes that never completed."""
        return self._advance(self._tokenizer.decode(self._window, skip_special_tokens=self.skip_special_tokens))

    def _advance(self, text: str) -> str:
        shown = self._tokenizer.decode(self._window[: self._shown], skip_special_tokens=self.skip_special_tokens)
        del self._window[: self._shown]  # the next window starts with the tokens of this piece
        self._shown = len(self._window)
        return text[len(shown) :]


# ---------------------------------------------------------------------- helpers


def _read_json(path: Path) -> dict[str, Any]:
    """An optional JSON file of a checkpoint folder: {} where it is absent."""
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error


def _id_list(value: Any, what: str) -> list[int]:
    """``eos_token_id`` as generation_config.json writes it: absent, one int, or a list of ints."""
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError(f"{what} must be an int or a list of ints, got {value!r}")
    return values


def _one_template(template: Any, source: str) -> str | None:
    """The chat template; older checkpoints store a list of named ones, of which "default" is the chat one."""
    if template is None or isinstance(template, str):
        return template
    if isinstance(template, list):
        named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
        if "default" in named:
            return named["default"]
    raise ValueError(f"{source}: chat_template should be a string (or a list holding one named 'default')")


def _raise_exception(message: str) -> None:
    """What a template calls to reject a conversation (a system turn in the wrong place, say)."""
    raise ValueError(f"chat template refused the conversation: {message}")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    """transformers' ``tojson``: Jinja's own escapes ``<``, ``>``, ``&`` and ``'`` for HTML, a prompt must not."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _compile_template(template: str, source: str) -> jinja2.Template:
    """The Jinja environment ``transformers`` renders chat templates in (sandboxed: a template is untrusted)."""
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    try:
        return environment.from_string(template)
    except jinja2.TemplateSyntaxError as error:
        message = f"{source}: the chat template is not valid Jinja (line {error.lineno}): {error.message}"
        raise ValueError(message) from error
