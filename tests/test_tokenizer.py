"""The tokenizer: GGUF metadata and Hugging Face folders, chat templates, and streaming detokenization."""

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import models, pre_tokenizers, processors

from course_lib.checkpoint.gguf import read_metadata
from course_lib.checkpoint.tokenizer import GGUF_CONTROL, GGUF_USER_DEFINED, Tokenizer

# --- SmolLM2-135M-Instruct, the course's real model ----------------------------------------------------

SMOLLM2_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
SMOLLM2_HI_PROMPT = SMOLLM2_SYSTEM + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
EMOJI_TEXT = "Emoji 🎉🧑\u200d🚀 and 東京タワー 🇯🇵 ok"  # a zero-width joiner inside the astronaut

# Expected ids, from two independent tokenizers reading the same GGUF file:
# - llama.cpp, through llama-cpp-python 0.3.36: Llama(path, vocab_only=True).tokenize(text.encode(), add_bos=False,
#   special=True). Its "smollm" pre-tokenizer splits off every number character (regex \p{N}), then applies
#   GPT-2's regex, exactly like the Digits + ByteLevel sequence of SmolLM2's Hugging Face tokenizer.json.
#   Our tokenizer matched it on all of ~7,900 test strings (222,000 tokens) when these were recorded.
# - transformers 5.17.0: AutoTokenizer.from_pretrained(dir, gguf_file=...).encode(text, add_special_tokens=False).
#   It agrees on every string here but the last two: its GGUF loader ignores tokenizer.ggml.pre and runs GPT-2's
#   regex alone, so whitespace next to a number character groups differently ("45  4c": [36, 37, 216, 216, 36, 83];
#   "  ½b": [216, 3351, 138, 82]). It agreed with us on all ~5,000 test strings with no number character in them.
SMOLLM2_EXPECTED = {
    "Hello world": [19556, 905],
    "In 2024, 12345 apples cost $3.50.": [788, 216, 34, 32, 34, 36, 28, 216, 33, 34, 35, 36, 37, 13855, 1708, 1885,
                                          35, 30, 37, 32, 30],
    "café ☕ 東京": [83, 1939, 2756, 4636, 242, 239, 17097, 247, 126, 16736, 122],
    "a\n\nb  c\t\td   ": [81, 198, 198, 82, 216, 265, 197, 197, 84, 333],
    "don't you're I'll": [12420, 982, 346, 2316, 339, 3060],
    "def f(x):\n    return x**2\n": [1604, 275, 24, 104, 727, 472, 1003, 1792, 828, 34, 198],
    EMOJI_TEXT: [10809, 33777, 15107, 232, 227, 10813, 117, 235, 321, 231, 10813, 244, 218,
                                           284, 17097, 247, 126, 16736, 122, 10391, 140, 11100, 124, 35130, 15107,
                                           225, 124, 10813, 225, 130, 10907],
    SMOLLM2_HI_PROMPT: [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407,
                        19712, 8182, 2, 198, 1, 4093, 198, 26843, 2, 198, 1, 520, 9531, 198],
    # transformers 5.17.0 differs on these two (see above):
    "45  4c": [36, 37, 256, 36, 83],
    "  ½b": [256, 16738, 82],
}

ROUND_TRIP_TEXTS = [
    "",
    " ",
    "Hello, world!",
    "  two leading spaces and trailing ones   ",
    "tabs\tand\nnewlines\r\n\n",
    "Numbers: 0 1 22 333 4444 3.14159 -1e-5 0x1F 1,000,000",
    "Ünïcödé Ελληνικά русский עברית العربية हिन्दी 한국어 日本語",
    "Emoji 🎉🧑‍🚀🇯🇵 and symbols ①②③ Ⅻ ²½ ∑∫√",
    "<|im_start|>user\nHi<|im_end|>\n",
    "code = {'a': [1, 2], \"b\": None}  # comment",
    "\x00\x01 control bytes \x7f",
]


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf: Path) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(read_metadata(smollm2_gguf), source=str(smollm2_gguf))


def test_smollm2_facts(smollm2):
    assert smollm2.vocab_size == 49152
    assert smollm2.bos_token_id == 1  # <|im_start|>
    assert smollm2.eos_token_ids == (2,)  # <|im_end|>
    assert smollm2.add_bos_token is False


@pytest.mark.parametrize("token, token_id", [("<|endoftext|>", 0), ("<|im_start|>", 1), ("<|im_end|>", 2)])
def test_smollm2_special_tokens_are_single_ids(smollm2, token, token_id):
    assert smollm2.encode(token) == [token_id]
    assert smollm2.encode(f"x{token}y") == [smollm2.encode("x")[0], token_id, smollm2.encode("y")[0]]
    assert smollm2.decode([token_id]) == token
    assert smollm2.decode([token_id], skip_special_tokens=True) == ""


@pytest.mark.parametrize("text", list(SMOLLM2_EXPECTED), ids=repr)
def test_smollm2_matches_llama_cpp(smollm2, text):
    assert smollm2.encode(text) == SMOLLM2_EXPECTED[text]
    assert smollm2.encode(text, add_special_tokens=False) == SMOLLM2_EXPECTED[text]  # SmolLM2 adds no BOS


def test_smollm2_splits_digits_one_per_token(smollm2):
    ids = smollm2.encode("x 9876543210")
    assert [smollm2.decode([i]) for i in ids] == ["x", " ", *"9876543210"]


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS, ids=repr)
def test_smollm2_round_trips(smollm2, text):
    assert smollm2.decode(smollm2.encode(text)) == text


def test_smollm2_chat_template(smollm2):
    prompt = smollm2.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert prompt == SMOLLM2_HI_PROMPT
    assert smollm2.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=False) == (
        SMOLLM2_HI_PROMPT.removesuffix("<|im_start|>assistant\n")
    )
    ids = smollm2.encode(prompt)
    assert ids == SMOLLM2_EXPECTED[SMOLLM2_HI_PROMPT]
    assert ids.count(1) == 3 and ids.count(2) == 2  # three turns opened, two closed: each marker one id
    assert ids[-4:] == [1, 520, 9531, 198]  # <|im_start|> "ass" "istant" "\n": the reply comes next


def test_smollm2_stream_never_shows_a_broken_character(smollm2):
    ids = smollm2.encode(EMOJI_TEXT)
    assert any("\ufffd" in smollm2.decode([i]) for i in ids)  # some tokens hold only part of a character
    stream = smollm2.detokenizer()
    pieces = [stream.push(i) for i in ids]
    assert "" in pieces  # some tokens completed no character and were held back ...
    assert not any("\ufffd" in piece for piece in pieces)  # ... so no piece shows a replacement character
    assert "".join(pieces) + stream.flush() == EMOJI_TEXT == smollm2.decode(ids)


def test_smollm2_stream_skips_special_tokens_by_default(smollm2):
    ids = smollm2.encode("<|im_start|>assistant\nHello there!<|im_end|>")
    quiet, verbose = smollm2.detokenizer(), smollm2.detokenizer(skip_special_tokens=False)
    pieces = [quiet.push(i) for i in ids]
    assert pieces[-1] == "" and "".join(pieces) == "assistant\nHello there!"  # the markers are not the reply
    assert "".join(verbose.push(i) for i in ids) == smollm2.decode(ids)
    assert smollm2.detokenizer().push(2) == ""
    assert smollm2.detokenizer(skip_special_tokens=False).push(2) == "<|im_end|>"


# --- a tiny byte-level BPE in GGUF form -----------------------------------------------------------------

BYTE_SYMBOLS = sorted(pre_tokenizers.ByteLevel.alphabet())  # the 256 printable stand-ins for the byte values


def tiny_gguf_metadata(**overrides) -> dict:
    """Byte symbols, a few merges ("Ġthe", "12"), two control tokens and one user-defined token."""
    tokens = ["<s>", "</s>", "<tool>", *BYTE_SYMBOLS, "Ġt", "he", "Ġthe", "12"]
    token_types = [GGUF_CONTROL, GGUF_CONTROL, GGUF_USER_DEFINED] + [1] * (len(tokens) - 3)
    metadata = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": token_types,
        "tokenizer.ggml.merges": ["Ġ t", "h e", "Ġt he", "1 2"],
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 1,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.chat_template": "{{ bos_token }}{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}",
    }
    return metadata | {f"tokenizer.{key}": value for key, value in overrides.items()}


def test_gguf_bpe_applies_merges_and_adds_bos():
    tokenizer = Tokenizer.from_gguf_metadata(tiny_gguf_metadata())
    ids = tokenizer.encode(" the")
    assert ids == [0, tokenizer.token_to_id("Ġthe")]  # BOS, then three merges made one token
    assert tokenizer.encode(" the", add_special_tokens=False) == ids[1:]
    assert tokenizer.decode(ids) == "<s> the" and tokenizer.decode(ids, skip_special_tokens=True) == " the"
    assert tokenizer.apply_chat_template([{"role": "user", "content": "x"}]) == "<s>x</s>"


def test_gguf_user_defined_tokens_match_whole_but_are_not_skipped():
    tokenizer = Tokenizer.from_gguf_metadata(tiny_gguf_metadata(**{"ggml.add_bos_token": False}))
    ids = tokenizer.encode("a<tool>b")
    assert ids == [tokenizer.token_to_id("a"), 2, tokenizer.token_to_id("b")]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a<tool>b"


@pytest.mark.parametrize("pre, pieces", [("smollm", ["1", "2"]), ("gpt2", ["12"])])
def test_gguf_pre_tokenizer_decides_how_digits_group(pre, pieces):
    tokenizer = Tokenizer.from_gguf_metadata(tiny_gguf_metadata(**{"ggml.pre": pre, "ggml.add_bos_token": False}))
    assert [tokenizer.id_to_token(i) for i in tokenizer.encode("12")] == pieces


def test_gguf_end_of_generation_ids_are_collected():
    tokenizer = Tokenizer.from_gguf_metadata(tiny_gguf_metadata(**{"ggml.eot_token_id": 2, "ggml.eom_token_id": 1}))
    assert tokenizer.eos_token_ids == (1, 2)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"ggml.model": "llama"}, "tokenizer.ggml.model 'llama' is not supported"),
        ({"ggml.model": None}, "no tokenizer.ggml.model"),
        ({"ggml.pre": "qwen2"}, "pre-tokenizer tokenizer.ggml.pre 'qwen2' is not implemented"),
        ({"ggml.merges": ["Ġ t", "nospace"]}, "merge 'nospace'"),
        ({"ggml.token_type": [1, 1]}, "2 token types for"),
        ({"ggml.bos_token_id": 10**6}, "outside the vocabulary"),
    ],
)
def test_gguf_refuses_what_it_cannot_build(overrides, message):
    metadata = {key: value for key, value in tiny_gguf_metadata(**overrides).items() if value is not None}
    with pytest.raises(ValueError, match=message):
        Tokenizer.from_gguf_metadata(metadata)


def test_stream_holds_back_a_split_character():
    tokenizer = Tokenizer.from_gguf_metadata(tiny_gguf_metadata(**{"ggml.add_bos_token": False}))
    ids = tokenizer.encode("é€")  # no merges for these: one token per UTF-8 byte, 2 + 3 of them
    assert len(ids) == 5
    stream = tokenizer.detokenizer()
    assert [stream.push(i) for i in ids] == ["", "é", "", "", "€"]
    assert stream.flush() == ""


def test_stream_flush_releases_bytes_that_never_complete():
    tokenizer = Tokenizer.from_gguf_metadata(tiny_gguf_metadata(**{"ggml.add_bos_token": False}))
    first_byte_of_euro = tokenizer.encode("€")[0]
    stream = tokenizer.detokenizer()
    assert stream.push(tokenizer.encode("a")[0]) == "a"
    assert stream.push(first_byte_of_euro) == ""
    assert stream.flush() == "\ufffd" == tokenizer.decode([first_byte_of_euro])


def test_ids_are_checked():
    tokenizer = Tokenizer.from_gguf_metadata(tiny_gguf_metadata())
    with pytest.raises(ValueError, match="token id 999999 is outside the vocabulary"):
        tokenizer.decode([3, 999999])
    with pytest.raises(TypeError, match="must be an integer"):
        tokenizer.decode([1.0])
    with pytest.raises(TypeError, match="encode takes a str"):
        tokenizer.encode(b"bytes")
    stream = tokenizer.detokenizer()
    with pytest.raises(ValueError, match="outside the vocabulary"):
        stream.push(-1)
    assert stream.push(tokenizer.encode("a", add_special_tokens=False)[0]) == "a"  # a refused id leaves no trace


# --- a Hugging Face checkpoint folder --------------------------------------------------------------------

WORDS = ["[UNK]", "<s>", "</s>", "hello", "world", "<eot>", "the", "<end>", "!"]
TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}\n"
    "    {% if loop.first and message['role'] != 'user' %}\n"
    "        {{ raise_exception('Conversations must start with a user turn') }}\n"
    "    {% endif %}\n"
    "{{ message['role'] }}: {{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}\n"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def write_folder(path: Path, tokenizer_config: dict | None = None, generation_config: dict | None = None,
                 post_processor: processors.PostProcessor | None = None) -> Path:
    """A word-level tokenizer.json plus the optional config files, as a checkpoint folder holds them."""
    backend = BackendTokenizer(models.WordLevel({word: i for i, word in enumerate(WORDS)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(["<s>", "</s>", "<eot>", "<end>"])
    if post_processor is not None:
        backend.post_processor = post_processor
    path.mkdir(parents=True, exist_ok=True)
    backend.save(str(path / "tokenizer.json"))
    for name, content in [("tokenizer_config.json", tokenizer_config), ("generation_config.json", generation_config)]:
        if content is not None:
            (path / name).write_text(json.dumps(content))
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    config = {"bos_token": "<s>", "eos_token": {"content": "</s>", "special": True}, "add_bos_token": True,
              "chat_template": TEMPLATE}
    return write_folder(tmp_path / "model", config, {"eos_token_id": [5, 7], "bos_token_id": 1})


def test_folder_tokens(folder):
    tokenizer = Tokenizer.from_pretrained_dir(folder)
    assert tokenizer.vocab_size == len(WORDS)
    assert tokenizer.bos_token_id == 1
    assert tokenizer.eos_token_ids == (2, 5, 7)  # tokenizer_config's eos_token, then generation_config's list
    assert tokenizer.encode("hello world !") == [1, 3, 4, 8]
    assert tokenizer.encode("hello world !", add_special_tokens=False) == [3, 4, 8]
    assert tokenizer.encode("hello mars") == [1, 3, 0]
    assert tokenizer.decode([1, 3, 4, 2]) == "<s> hello world </s>"
    assert tokenizer.decode([1, 3, 4, 2], skip_special_tokens=True) == "hello world"


def test_folder_stream_matches_decode(folder):
    tokenizer = Tokenizer.from_pretrained_dir(folder)
    ids = [1, 3, 6, 4, 8, 5]
    stream = tokenizer.detokenizer()
    assert "".join(stream.push(i) for i in ids) + stream.flush() == tokenizer.decode(ids, skip_special_tokens=True)
    stream = tokenizer.detokenizer(skip_special_tokens=False)
    everything = "".join(stream.push(i) for i in ids) + stream.flush()
    assert everything == tokenizer.decode(ids) == "<s> hello the world ! <eot>"


def test_folder_chat_template(folder):
    tokenizer = Tokenizer.from_pretrained_dir(folder)
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]
    # trim_blocks and lstrip_blocks: the indentation before block tags and the line break after them vanish
    assert tokenizer.apply_chat_template(messages) == "<s>user: hello</s>\nassistant: world</s>\nassistant:"
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=False).endswith("world</s>\n")
    with pytest.raises(ValueError, match="Conversations must start with a user turn"):
        tokenizer.apply_chat_template([{"role": "assistant", "content": "hi"}])
    with pytest.raises(TypeError, match="list of dicts"):
        tokenizer.apply_chat_template("hello")


def test_folder_template_file_and_tojson(folder):
    (folder / "chat_template.jinja").write_text("{{ messages | tojson }}")  # newer transformers save it here
    rendered = Tokenizer.from_pretrained_dir(folder).apply_chat_template([{"role": "user", "content": "<café>"}])
    assert rendered == '[{"role": "user", "content": "<café>"}]'  # not HTML-escaped, not ASCII-escaped


def test_folder_minimal(tmp_path):
    tokenizer = Tokenizer.from_pretrained_dir(write_folder(tmp_path))
    assert (tokenizer.bos_token_id, tokenizer.eos_token_ids, tokenizer.chat_template) == (None, (), None)
    assert tokenizer.encode("hello") == [3]
    with pytest.raises(ValueError, match="has no chat template"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hello"}])


def test_folder_bos_from_the_post_processor(tmp_path):
    """Without add_bos_token in the config, BOS is added exactly when tokenizer.json's pipeline adds it."""
    adds_bos = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = Tokenizer.from_pretrained_dir(write_folder(tmp_path, {"bos_token": "<s>"}, post_processor=adds_bos))
    assert tokenizer.add_bos_token is True
    assert tokenizer.encode("hello") == [1, 3]  # once, not twice


@pytest.mark.parametrize(
    "tokenizer_config, generation_config, error, message",
    [
        ({"eos_token": "<nope>"}, None, ValueError, "eos_token '<nope>' is not in the vocabulary"),
        (None, {"eos_token_id": "2"}, ValueError, "eos_token_id must be an int or a list of ints"),
        ({"chat_template": "{% for %}"}, None, ValueError, "not valid Jinja"),
        ({"chat_template": [{"name": "tool_use", "template": "x"}]}, None, ValueError, "named 'default'"),
    ],
)
def test_folder_bad_configs(tmp_path, tokenizer_config, generation_config, error, message):
    folder = write_folder(tmp_path, tokenizer_config, generation_config)
    with pytest.raises(error, match=message):
        Tokenizer.from_pretrained_dir(folder).apply_chat_template([{"role": "user", "content": "hello"}])


def test_folder_without_tokenizer_json(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="has no tokenizer.json; a Hugging Face checkpoint folder holds"):
        Tokenizer.from_pretrained_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match="no checkpoint folder"):
        Tokenizer.from_pretrained_dir(tmp_path / "missing")
