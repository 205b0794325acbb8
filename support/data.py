"""Data plumbing for SRPO: images, tokenizer, chat template, JSONL records, prompts, batching.

- Images are preprocessed exactly like transformers' Qwen2VLImageProcessor: resize (PIL bicubic)
  so both sides are multiples of 28 and the pixel count lies in [min_pixels, max_pixels], scale
  to [0,1], normalise with the CLIP mean/std, repeat the frame to 2 temporal steps and cut into
  2x14x14 patches ordered so that each 2x2 block of patches (one merged vision token) is
  contiguous. Output: (gh*gw, 3*2*14*14) float32 and grid_thw = (1, gh, gw).
- The tokenizer is a byte-level BPE `tokenizers.Tokenizer` from a checkpoint's tokenizer.json
  (the real Qwen2.5-VL one or the tiny one trained here by train_tokenizer); special token ids
  are looked up by their strings.
- The chat template is Qwen2.5-VL's. encode_messages tokenizes a conversation piece by piece
  (the assistant header, each assistant content + <|im_end|>, everything else), which equals
  tokenizing the rendered text (special tokens split the text anyway) and makes the assistant
  mask exact; each <|image_pad|> is expanded to gh*gw/merge^2 tokens.
- JSONL I/O reports file:line on bad input (invalid JSON, invalid UTF-8); append_jsonl writes one
  whole line per call, fsynced; write_json_atomic replaces a JSON file in one rename.
- Text from files never becomes control tokens: encode_messages refuses message text that contains
  a special-token string (<|im_end|>, <|image_pad|>, ...), which would otherwise be tokenized as
  the real control token (a question could end its own turn or fake an image), and refuses
  conversations longer than max_tokens (default MAX_TOKENS), so one huge record cannot make the
  trainer or the sampler allocate tens of GB. Errors name the record (`where`, e.g. file:line).
- validate_records checks every record of a file before the first step (schema, NaN / Infinity,
  control tokens, length caps, every image opened, pixel-capped and checked to decode): a bad
  record is refused at start with file:line and the reason (BadRecords lists the first 20 and the
  count) or, with skip_bad (--skip_bad_records), dropped and counted, never found when first drawn.
"""
import json
import math
import os
import re
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

# -----------------------------------------------------------------------------
# images

IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
# a source image over this many pixels is refused before any pixel is decoded: a few hundred KB of
# PNG can declare 400M pixels (a decompression bomb); PIL itself only warns from 89M
MAX_IMAGE_PIXELS = 8192 * 8192


@dataclass
class ImageConfig:
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2


def smart_resize(height, width, factor=28, min_pixels=56 * 56, max_pixels=28 * 28 * 1280):
    """(h, w) closest to (height, width) with both divisible by factor and h*w in [min, max].
    Aspect ratios above 200 are refused (as transformers does): such a strip cannot be resized
    into the pixel budget without a side shrinking below one patch."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"image aspect ratio must be <= 200, got {height}x{width} (height x width)")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:  # shrink, rounding down so we stay under the budget
        scale = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / scale / factor) * factor)
        w = max(factor, math.floor(width / scale / factor) * factor)
    elif h * w < min_pixels:  # grow, rounding up so we reach the minimum
        scale = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * scale / factor) * factor
        w = math.ceil(width * scale / factor) * factor
    return h, w


def to_rgb(img):
    """RGB copy of a PIL image; transparency is composited onto white (as transformers does)."""
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        img = img.convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img).convert("RGB")
    return img.convert("RGB")


def preprocess_image(img, cfg=ImageConfig()):
    """PIL image -> (pixel_values (gh*gw, 3*T*p*p) float32, grid_thw (3,) long = (1, gh, gw))."""
    p, m, t = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    img = to_rgb(img)
    h, w = smart_resize(img.height, img.width, p * m, cfg.min_pixels, cfg.max_pixels)
    img = img.resize((w, h), resample=Image.Resampling.BICUBIC)
    x = (np.asarray(img).astype(np.float64) * (1 / 255)).astype(np.float32)  # (h, w, 3) in [0, 1]
    x = (x - np.array(IMAGE_MEAN, np.float32)) / np.array(IMAGE_STD, np.float32)
    x = x.transpose(2, 0, 1)  # (3, h, w)
    gh, gw = h // p, w // p
    x = x.reshape(3, gh // m, m, p, gw // m, m, p)
    x = x.transpose(1, 4, 2, 5, 0, 3, 6)  # (gh/m, gw/m, m, m, 3, p, p): merge blocks contiguous
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], t, p, p))  # same frame t times
    x = x.reshape(gh * gw, 3 * t * p * p)
    return torch.from_numpy(np.ascontiguousarray(x)), torch.tensor([1, gh, gw], dtype=torch.long)


def image_grid(img, cfg=ImageConfig()):
    """grid_thw (3,) long of preprocess_image(img, cfg), without computing the pixels."""
    h, w = smart_resize(img.height, img.width, cfg.patch_size * cfg.merge_size, cfg.min_pixels, cfg.max_pixels)
    return torch.tensor([1, h // cfg.patch_size, w // cfg.patch_size], dtype=torch.long)


def load_image(path, where=""):
    """Open and fully decode an image as RGB; errors name `where` (e.g. 'train.jsonl:12')."""
    prefix = f"{where}: " if where else ""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{prefix}image file not found: {path}")
    try:
        with Image.open(path) as img:
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise ValueError(f"{img.width}x{img.height} pixels, over the cap of {MAX_IMAGE_PIXELS}")
            img.load()
            return to_rgb(img)
    except Exception as e:  # PIL raises several types for corrupt/truncated files
        raise ValueError(f"{prefix}cannot read image {path}: {type(e).__name__}: {e}") from e


def _image_header(path, where=""):
    """An image opened for its size only (no pixel decoded); errors as load_image's."""
    prefix = f"{where}: " if where else ""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{prefix}image file not found: {path}")
    try:
        with Image.open(path) as img:
            return img
    except Exception as e:
        raise ValueError(f"{prefix}cannot read image {path}: {type(e).__name__}: {e}") from e


def check_image_file(path, max_pixels=MAX_IMAGE_PIXELS):
    """(width, height) of an image file once it is known to decode; ValueError saying why not. The
    size comes from the header and is capped before any pixel is decoded (decompression bombs);
    then PNG is checked with verify() (every chunk's CRC, up to the end marker: a cut or corrupted
    file shows, at a third of the cost of decoding), JPEG is decoded at 1/8 scale (the whole
    entropy-coded stream is still read, so a cut file shows), any other format fully."""
    if not os.path.isfile(path):
        raise ValueError(f"image file not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                to_rgb(Image.new(img.mode, (1, 1)))   # a pixel mode preprocessing cannot turn into RGB fails here
                if 0 < w * h <= max_pixels:
                    if img.format == "PNG":
                        img.verify()
                    else:
                        if img.format == "JPEG":
                            img.draft(img.mode, (max(1, w // 8), max(1, h // 8)))
                        img.load()
    except Exception as e:  # PIL raises several types for empty, cut, corrupt or huge files
        raise ValueError(f"cannot read image {path}: {type(e).__name__}: {e}") from None
    if w * h > max_pixels:
        raise ValueError(f"image {path} is {w}x{h} = {w * h:,} pixels, over the cap of {max_pixels:,} "
                         f"(a decompression bomb?); shrink it")
    if w * h == 0:
        raise ValueError(f"image {path} has no pixels ({w}x{h})")
    return w, h


# -----------------------------------------------------------------------------
# JSONL


def read_jsonl_numbered(path, allow_torn_tail=False, errors=None):
    """[(where "file:LINE", record)] for every non-blank line. allow_torn_tail: ignore an
    unterminated, unparsable last line (a writer that crashed mid-append) instead of raising.
    errors: a list: a bad line (invalid UTF-8 or JSON, not an object) is appended to it as
    (where, reason) and skipped, instead of raised (validate_records reports them with the rest)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"JSONL file not found: {path}")
    with open(path, "rb") as f:  # bytes: a bad UTF-8 sequence is reported with its line number
        lines = f.read().split(b"\n")
    torn = lines[-1] != b""  # the file does not end with a newline
    records = []

    def bad(i, reason):
        if errors is None:
            raise ValueError(f"{path}:{i}: {reason}")
        errors.append((f"{path}:{i}", reason))
    for i, raw in enumerate(lines, start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            if torn and i == len(lines) and allow_torn_tail:
                break  # a torn write can cut a multi-byte character in half
            bad(i, f"not valid UTF-8 (byte {e.start + 1} of the line)")
            continue
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if torn and i == len(lines):
                if allow_torn_tail:
                    break
                bad(i, f"last line is incomplete (torn write?): {e.msg} at column {e.colno}")
                continue
            bad(i, f"invalid JSON: {e.msg} at column {e.colno}")
            continue
        except RecursionError:  # [[[[...]]]] nested deeper than Python's stack
            bad(i, "invalid JSON: nested too deeply")
            continue
        if not isinstance(rec, dict):
            bad(i, f"expected a JSON object, got {type(rec).__name__}")
            continue
        records.append((f"{path}:{i}", rec))
    return records


def read_jsonl(path, allow_torn_tail=False):
    """List of dicts, one per non-blank line (read_jsonl_numbered without the line numbers)."""
    return [rec for _, rec in read_jsonl_numbered(path, allow_torn_tail)]


def finite_json(obj):
    """obj with every non-finite float replaced by None: json.dumps would write NaN / Infinity,
    which is not JSON (jq, JavaScript and strict parsers reject the whole line)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def write_json_atomic(path, obj):
    """Write obj as strict JSON (non-finite floats as null) to a temporary file, fsync, then rename
    over path: a reader (or a run killed mid-write) sees the old file or the new one, never half of one."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(finite_json(obj), f, indent=1, ensure_ascii=False, allow_nan=False)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:                                              # e.g. a full disk: no partial file left
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    os.replace(tmp, path)


def append_jsonl(path, record):
    """Append one record as one strict-JSON line (NaN / Infinity refused: ValueError) with a single
    write(), then flush + fsync."""
    line = (json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        n = os.write(fd, line)
        if n != len(line):
            raise OSError(f"{path}: short write ({n} of {len(line)} bytes)")
        os.fsync(fd)
    finally:
        os.close(fd)


# -----------------------------------------------------------------------------
# tokenizer

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
FORMAT_TAGS = ["<think>", "</think>", "<answer>", "</answer>", "<reflection>", "</reflection>"]
# Qwen2's pre-tokenizer split: contractions, letters, single digits, punctuation runs, newlines, spaces
QWEN_SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


class Tokenizer:
    """A tokenizers.Tokenizer plus the Qwen special-token ids, looked up by string."""

    def __init__(self, tok, path=""):
        self.tok = tok
        self.path = path

        def tid(s):
            i = tok.token_to_id(s)
            if i is None:
                raise ValueError(f"{path}: tokenizer has no special token {s}")
            return i
        self.endoftext_id = tid("<|endoftext|>")
        self.im_start_id = tid("<|im_start|>")
        self.im_end_id = tid("<|im_end|>")
        self.vision_start_id = tid("<|vision_start|>")
        self.vision_end_id = tid("<|vision_end|>")
        self.image_pad_id = tid("<|image_pad|>")
        self.video_pad_id = tid("<|video_pad|>")
        self.pad_id = self.endoftext_id
        # the processor's image settings (min / max pixels): the scripts set them from the
        # checkpoint's preprocessor_config.json and --max_pixels (hf_checkpoint.image_config)
        self.image_cfg = ImageConfig()

    @classmethod
    def from_dir(cls, path):
        from tokenizers import Tokenizer as HFTokenizer
        f = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(f):
            raise FileNotFoundError(f"no tokenizer.json in {path}")
        return cls(HFTokenizer.from_file(f), f)

    @property
    def vocab_size(self):  # incl. added tokens: embeddings must have at least this many rows
        return self.tok.get_vocab_size(with_added_tokens=True)

    @property
    def eos_ids(self):
        return [self.im_end_id, self.endoftext_id]

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens=False):
        if torch.is_tensor(ids):
            ids = ids.tolist()
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def count_tokens(self, text):
        return len(self.encode(text))

    @property
    def special_tokens(self):
        """The strings this tokenizer turns into special (control) tokens wherever they occur in text."""
        return [t.content for t in self.tok.get_added_tokens_decoder().values() if t.special]


def train_tokenizer(texts, out_dir, vocab_size=1024):
    """Train a Qwen2-style byte-level BPE on `texts`, add the Qwen special tokens and the format
    tags, write out_dir/tokenizer.json + tokenizer_config.json. vocab_size counts everything
    (the corpus may be too small to reach it, then the vocab is smaller)."""
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer
    tok = HFTokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    n_bpe = vocab_size - len(QWEN_SPECIAL_TOKENS) - len(FORMAT_TAGS)
    if n_bpe < 256:
        raise ValueError(f"vocab_size {vocab_size} too small: need 256 bytes + "
                         f"{len(QWEN_SPECIAL_TOKENS) + len(FORMAT_TAGS)} added tokens")
    trainer = trainers.BpeTrainer(vocab_size=n_bpe, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[], show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in QWEN_SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(s, special=False, normalized=False) for s in FORMAT_TAGS])
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "unk_token": None, "model_max_length": 32768, "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False, allow_nan=False)
    return Tokenizer.from_dir(out_dir)


# -----------------------------------------------------------------------------
# prompts and chat template

SYSTEM_PROMPT_SINGLE = (
    "You are a helpful assistant that solves visual reasoning problems. "
    "Look at the image, think step by step, then answer. "
    "Respond in exactly this format:\n"
    "<think>your reasoning</think>\n"
    "<answer>your final answer</answer>\n"
    "Both blocks must be non-empty. Put only the answer (a number, a letter or an expression, "
    "optionally in \\boxed{}) inside <answer>, and write nothing after </answer>."
)

SYSTEM_PROMPT_REFLECT = (
    "You are a helpful assistant that solves visual reasoning problems and then checks its own work. "
    "Look at the image, think step by step and answer; then reflect on that first attempt "
    "(check each step against the image and the question, say what was wrong or confirm what was "
    "right); then solve the problem again using the reflection and give your final answer. "
    "Respond in exactly this format:\n"
    "<think>first reasoning</think>\n"
    "<answer>first answer</answer>\n"
    "<reflection>critique of the first attempt</reflection>\n"
    "<think>second reasoning, improved by the reflection</think>\n"
    "<answer>final answer</answer>\n"
    "Every block must be non-empty. Put only the answer (a number, a letter or an expression, "
    "optionally in \\boxed{}) inside each <answer>, and write nothing after the last </answer>."
)

# The paper's SFT target (Eq. 1, Appendix B.4): reflection, then the final answer
# with no second reasoning pass (reflect_data.py --target paper trains it).
SYSTEM_PROMPT_REFLECT_PAPER = (
    "You are a helpful assistant that solves visual reasoning problems and then checks its own work. "
    "Look at the image, think step by step and answer; then reflect on that first attempt "
    "(check each step against the image and the question, say what was wrong or confirm what was "
    "right); then give your final answer. "
    "Respond in exactly this format:\n"
    "<think>reasoning</think>\n"
    "<answer>first answer</answer>\n"
    "<reflection>critique of the first attempt</reflection>\n"
    "<answer>final answer</answer>\n"
    "Every block must be non-empty. Put only the answer (a number, a letter or an expression, "
    "optionally in \\boxed{}) inside each <answer>, and write nothing after the last </answer>."
)

DEFAULT_SYSTEM = "You are a helpful assistant."

# Qwen2.5-VL's chat template (behaviour), saved into tokenizer_config.json; render_chat is its Python twin.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# Qwen-style control tokens look like <|name|>; a tokenizer may define more (Tokenizer.special_tokens).
CONTROL_TOKEN_RE = re.compile(r"<\|[^<>|\s]{1,64}\|>")
MAX_TOKENS = 16384  # default cap on one encoded conversation (prompt + response, image tokens included)
ROLES = ("system", "user", "assistant", "tool")


def find_control_token(text, specials=()):
    """The first control-token string in text (<|...|> or one of `specials`), or None."""
    m = CONTROL_TOKEN_RE.search(text)
    hits = [(m.start(), m.group(0))] if m else []
    hits += [(text.find(s), s) for s in specials if s in text]
    return min(hits)[1] if hits else None


def _content_text(content, where=""):
    """Message content (string or list of parts) -> text with one vision placeholder per image."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError(f"{where}: message content must be a string or a list, got {type(content).__name__}")
    out = []
    for part in content:
        if not isinstance(part, dict):
            raise ValueError(f"{where}: content part must be an object, got {type(part).__name__}")
        kind = part.get("type")
        if kind == "image" or "image" in part or "image_url" in part:
            out.append("<|vision_start|><|image_pad|><|vision_end|>")
        elif kind == "video" or "video" in part:
            out.append("<|vision_start|><|video_pad|><|vision_end|>")
        elif "text" in part:
            if not isinstance(part["text"], str):
                raise ValueError(f"{where}: field 'text' must be a string, got {type(part['text']).__name__}")
            out.append(part["text"])
    return "".join(out)


def message_texts(messages, where=""):
    """(where, text) of every text a conversation carries: roles, string contents, text parts.
    Checks the structure on the way (errors name messages[i] and the field)."""
    if not isinstance(messages, list):
        raise ValueError(f"{where}: field 'messages' must be a list, got {type(messages).__name__}")
    out = []
    for i, msg in enumerate(messages):
        at = f"{where}: messages[{i}]"
        if not isinstance(msg, dict):
            raise ValueError(f"{at} must be an object, got {type(msg).__name__}")
        for key in ("role", "content"):
            if key not in msg or msg[key] is None:
                raise ValueError(f"{at}: field '{key}' missing")
        if msg["role"] not in ROLES:
            raise ValueError(f"{at}: field 'role' must be one of {', '.join(ROLES)}, got {str(msg['role'])[:40]!r}")
        c = msg["content"]
        if isinstance(c, str):
            out.append((f"{at}.content", c))
        elif isinstance(c, list):
            for j, part in enumerate(c):
                if not isinstance(part, dict):
                    raise ValueError(f"{at}.content[{j}] must be an object, got {type(part).__name__}")
                if "text" in part:
                    if not isinstance(part["text"], str):
                        raise ValueError(f"{at}.content[{j}]: field 'text' must be a string, "
                                         f"got {type(part['text']).__name__}")
                    out.append((f"{at}.content[{j}].text", part["text"]))
        else:
            raise ValueError(f"{at}: field 'content' must be a string or a list of parts, got {type(c).__name__}")
    return out


def check_no_control_tokens(messages, where="", specials=()):
    """Refuse a conversation whose text contains a control-token string: tokenized, it would be the
    control token itself (a question that ends its turn, a fake image slot, a fake end of response)."""
    for at, text in message_texts(messages, where):
        tok = find_control_token(text, specials)
        if tok is not None:
            raise ValueError(f"{at}: text contains the control token {tok!r}; data text must not "
                             f"contain special-token strings (remove it from the data)")


def _chat_pieces(messages, add_generation_prompt, where=""):
    """The rendered chat as [(text, is_assistant_content)]; joined it is render_chat's output."""
    pieces = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or msg.get("role") is None or msg.get("content") is None:
            raise ValueError(f"{where}: messages[{i}] needs 'role' and 'content'")
        if i == 0 and msg["role"] != "system":
            pieces.append((f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n", False))
        text = _content_text(msg["content"], f"{where}: messages[{i}]")
        if msg["role"] == "assistant":
            pieces.append(("<|im_start|>assistant\n", False))
            pieces.append((text + "<|im_end|>", True))
            pieces.append(("\n", False))
        else:
            pieces.append((f"<|im_start|>{msg['role']}\n{text}<|im_end|>\n", False))
    if add_generation_prompt:
        pieces.append(("<|im_start|>assistant\n", False))
    return pieces


def render_chat(messages, add_generation_prompt=False):
    """Qwen2.5-VL chat template text; one <|vision_start|><|image_pad|><|vision_end|> per image."""
    return "".join(text for text, _ in _chat_pieces(messages, add_generation_prompt))


def prompt_messages(record, system_prompt, where=""):
    """record's messages up to and including the last user turn, system message := system_prompt
    (None keeps the record's own). Errors name `where` (default: the record's id)."""
    msgs = record.get("messages")
    where = where or f"record {record.get('id', '?')}"
    if not isinstance(msgs, list):
        raise ValueError(f"{where}: field 'messages' missing or not a list")
    message_texts(msgs, where)  # structure: every message an object with a role and a content
    last_user = max((i for i, m in enumerate(msgs) if m.get("role") == "user"), default=None)
    if last_user is None:
        raise ValueError(f"{where}: 'messages' has no user turn")
    msgs = msgs[:last_user + 1]
    if system_prompt is None:
        return list(msgs)
    rest = [m for m in msgs if m.get("role") != "system"]
    return [{"role": "system", "content": system_prompt}] + rest


def _images(messages):
    """Image references of the conversation, in order."""
    out = []
    for msg in messages:
        if isinstance(msg["content"], list):
            for part in msg["content"]:
                if part.get("type") == "image" or "image" in part or "image_url" in part:
                    out.append(part.get("image", part.get("image_url")))
    return out


def encode_messages(messages, tokenizer, image_root, image_cfg=None, add_generation_prompt=False,
                    where="", max_tokens=MAX_TOKENS, pixels=True):
    """Tokenize a conversation. image refs are paths relative to image_root (or PIL images), sized
    by image_cfg (None: the tokenizer's processor settings, tokenizer.image_cfg).
    Returns input_ids (T,), assistant_mask (T,) (True on assistant content + its <|im_end|>),
    pixel_values (N, 1176) or None (always None with pixels=False: only the tokens are wanted, e.g.
    to count them; only the images' headers are read: validate_records checks that they decode),
    image_grid_thw (n_img, 3) or None.
    Refuses (ValueError naming `where`): malformed messages, control-token strings in their text,
    unreadable or degenerate images, more than max_tokens tokens (0 = no cap)."""
    texts = message_texts(messages, where)
    check_no_control_tokens(messages, where, tokenizer.special_tokens)
    n_chars = sum(len(t) for _, t in texts)
    if max_tokens and n_chars > 64 * max_tokens:  # too long for any tokenizer: do not even tokenize it
        raise ValueError(f"{where}: {n_chars} characters of text, over the cap of {max_tokens} tokens")
    image_cfg = image_cfg or tokenizer.image_cfg
    pixel_rows, grids = [], []
    for ref in _images(messages):
        if isinstance(ref, Image.Image):
            img = ref
        elif isinstance(ref, str):
            img = (load_image if pixels else _image_header)(os.path.join(image_root, ref), where)
        else:
            raise ValueError(f"{where}: image must be a path string or a PIL image, got {type(ref).__name__}")
        try:
            if pixels:
                pv, thw = preprocess_image(img, image_cfg)
                pixel_rows.append(pv)
            else:
                thw = image_grid(img, image_cfg)
        except ValueError as e:  # e.g. a 1x300 strip: name the image, not just the shape
            raise ValueError(f"{where}: image {ref if isinstance(ref, str) else 'PIL'}: {e}") from None
        grids.append(thw)
    n_pad = [int(g.prod()) // image_cfg.merge_size ** 2 for g in grids]  # LLM tokens per image

    ids, mask = [], []
    for text, is_asst in _chat_pieces(messages, add_generation_prompt, where):
        piece = tokenizer.encode(text)
        ids += piece
        mask += [is_asst] * len(piece)
    n_tokens = len(ids) + sum(n - 1 for n in n_pad)  # each <|image_pad|> becomes n tokens
    if max_tokens and n_tokens > max_tokens:
        raise ValueError(f"{where}: {n_tokens} tokens (text and images), over the cap of {max_tokens} "
                         f"(max_tokens; shorten the record or raise the cap)")
    # expand each <|image_pad|> to its image's token count
    out_ids, out_mask, k = [], [], 0
    for t, a in zip(ids, mask):
        if t == tokenizer.image_pad_id:
            if k >= len(n_pad):
                raise ValueError(f"{where}: more <|image_pad|> tokens than images")
            out_ids += [t] * n_pad[k]
            out_mask += [a] * n_pad[k]
            k += 1
        else:
            out_ids.append(t)
            out_mask.append(a)
    if k != len(n_pad):
        raise ValueError(f"{where}: {len(n_pad)} images but {k} <|image_pad|> tokens (an image inside "
                         f"text? put images in their own content part)")
    return dict(
        input_ids=torch.tensor(out_ids, dtype=torch.long),
        assistant_mask=torch.tensor(out_mask, dtype=torch.bool),
        pixel_values=torch.cat(pixel_rows) if pixel_rows else None,
        image_grid_thw=torch.stack(grids) if grids else None,
    )


def collate(encoded, pad_id, left_pad):
    """Pad a list of encode_messages outputs into a batch (left_pad for generation)."""
    T = max(len(e["input_ids"]) for e in encoded)
    B = len(encoded)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    assistant_mask = torch.zeros((B, T), dtype=torch.bool)
    for i, e in enumerate(encoded):
        n = len(e["input_ids"])
        sl = slice(T - n, T) if left_pad else slice(0, n)
        input_ids[i, sl] = e["input_ids"]
        attention_mask[i, sl] = 1
        assistant_mask[i, sl] = e["assistant_mask"]
    pv = [e["pixel_values"] for e in encoded if e.get("pixel_values") is not None]
    thw = [e["image_grid_thw"] for e in encoded if e.get("image_grid_thw") is not None]
    return dict(
        input_ids=input_ids,            # (B, T)
        attention_mask=attention_mask,  # (B, T) 1 = real token
        assistant_mask=assistant_mask,  # (B, T)
        pixel_values=torch.cat(pv) if pv else None,        # (sum N, 1176)
        image_grid_thw=torch.cat(thw) if thw else None,    # (n_images, 3)
    )


# -----------------------------------------------------------------------------
# record validation: every record of a file checked before the first step, not when first drawn

MAX_LISTED = 20  # bad records named one by one in a BadRecords message; the rest are counted


class BadRecords(ValueError):
    """validate_records refused records: .bad = [(where, reason)], .total = records in the file.
    One bad record is one line (file:line, field, reason); more are a count, then one line each."""

    def __init__(self, path, bad, total, usable=True):
        self.path, self.bad, self.total = path, bad, total
        hint = ("fix them, or pass --skip_bad_records to drop them" if usable else
                f"no usable record in {path}")
        lines = [f"{where}: {reason}" for where, reason in bad[:MAX_LISTED]]
        if len(bad) == 1:
            super().__init__(f"{lines[0]} (1 bad record of {total}; {hint.replace('them', 'it')})")
        else:
            more = [f"... and {len(bad) - MAX_LISTED} more"] if len(bad) > MAX_LISTED else []
            super().__init__("\n  ".join([f"{path}: {len(bad)} bad records of {total} ({hint}):"] + lines + more))


def _non_finite(x, at=""):
    """Field path of the first NaN / Infinity in a parsed JSON value (Python's json reads them), or None."""
    if isinstance(x, float) and not math.isfinite(x):
        return at
    items = (((f"{at}.{k}" if at else str(k)), v) for k, v in x.items()) if isinstance(x, dict) else \
        ((f"{at}[{i}]", v) for i, v in enumerate(x)) if isinstance(x, list) else ()
    for sub, v in items:
        hit = _non_finite(v, sub)
        if hit:
            return hit
    return None


def _check_unicode(text, field):
    """A lone surrogate (JSON "\\ud800") is not text any tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{field}: not valid Unicode (a lone surrogate at character {e.start + 1})") from None


def _record_images(messages):
    """[(field, ref)] of every image part of a conversation (ref as written: a path, or anything).
    A video part is refused: the model takes images only."""
    out = []
    for i, msg in enumerate(messages):
        for j, part in enumerate(msg["content"] if isinstance(msg["content"], list) else []):
            is_image = part.get("type") == "image" or "image" in part or "image_url" in part
            if not is_image and (part.get("type") == "video" or "video" in part):
                raise ValueError(f"messages[{i}].content[{j}]: a video part; only images are supported")
            if is_image:
                key = "image" if "image" in part or "image_url" not in part else "image_url"
                out.append((f"messages[{i}].content[{j}].{key}", part.get(key)))
    return out


def _check_record(rec, where, require, to_messages, check, specials, max_chars):
    """The checks of one record that need no image and no tokenizer -> (its messages, [(field, ref)]).
    Raises ValueError with the reason (without `where`)."""
    try:
        json.dumps(rec, allow_nan=False)   # C speed; the field is looked for only when there is one
        at = None
    except ValueError:
        at = _non_finite(rec)
    if at:
        raise ValueError(f"field '{at}': NaN / Infinity is not a JSON number; write a finite number or a string")
    for key in require:
        if rec.get(key) is None:
            raise ValueError(f"field '{key}' missing")
    opts = rec.get("options")   # multiple choice: the reward reads them as texts
    if opts is not None and not (isinstance(opts, list) and all(isinstance(o, (str, int, float)) and
                                                                not isinstance(o, bool) for o in opts)):
        raise ValueError(f"field 'options' must be a list of strings, got {str(opts)[:60]!r}")
    if check:
        try:
            check(rec, where)
        except ValueError:
            raise
        except Exception as e:  # e.g. a TypeError on a field of an unexpected type: this record's problem
            raise ValueError(f"{type(e).__name__}: {e}") from None
    for key in ("question", "answer"):  # the texts a stage may show a model outside 'messages'
        v = rec.get(key)
        if isinstance(v, str):
            _check_unicode(v, f"field '{key}'")
            tok = find_control_token(v, specials)
            if tok is not None:
                raise ValueError(f"field '{key}' contains the control token {tok!r}; data text must not contain "
                                 f"special-token strings (remove it from the data)")
            if max_chars and len(v) > max_chars:
                raise ValueError(f"field '{key}': {len(v):,} characters, over the cap of {max_chars:,}")
    own = rec.get("messages")
    msgs = to_messages(rec, where) if to_messages else own   # the conversation the stage encodes
    for at, text in message_texts(own, where):   # fields named in the record's own messages
        _check_unicode(text, at.removeprefix(f"{where}: "))
        tok = find_control_token(text, specials)
        if tok is not None:
            raise ValueError(f"{at}: text contains the control token {tok!r}; data text must not contain "
                             f"special-token strings (remove it from the data)")
    n_chars = sum(len(t) for _, t in message_texts(msgs, where))
    if max_chars and n_chars > max_chars:
        raise ValueError(f"field 'messages': {n_chars:,} characters of text, over the cap of {max_chars:,}")
    return msgs, _record_images(own), [ref for _, ref in _record_images(msgs)]


def validate_records(records, path, tokenizer=None, *, require=("messages",), messages=None, check=None,
                     image_root=None, add_generation_prompt=False, max_tokens=MAX_TOKENS,
                     max_image_pixels=MAX_IMAGE_PIXELS, skip_bad=False, bad=(), prog="", quiet=False,
                     image_cache=None):
    """Check every record before any work: records [(where "file:LINE", record)] -> (good, bad),
    good the usable (where, record) pairs in order, bad [(where, reason)].

    A record is bad when: a number is NaN / Infinity; a `require`d field is missing; 'options' is not
    a list of texts; check(record, where) raises (a caller's own rules, e.g. a readable ground truth); 'question' /
    'answer' or the text of its conversation (messages(record, where), default record['messages'],
    the conversation the stage encodes) is malformed, holds a control-token string or a lone
    surrogate, has a video part, or is longer than 64 x max_tokens characters; an image is missing, unreadable, cut, over max_image_pixels or
    of an aspect ratio the preprocessing refuses; with a tokenizer, the encoded conversation (its
    image tokens included, as encode_messages counts them) is over max_tokens. Each distinct image
    file is checked once (check_image_file; image_cache: a dict shared between calls).
    bad: problems found before (e.g. read_jsonl_numbered(errors=...)), reported with the rest.
    Any bad record raises BadRecords (file:line and reason of the first MAX_LISTED, and the count)
    unless skip_bad, which drops them and reports the count on stderr (quiet: not even that); no
    usable record at all raises BadRecords either way."""
    image_root = os.path.dirname(os.path.abspath(path)) if image_root is None else image_root
    specials = tokenizer.special_tokens if tokenizer is not None else QWEN_SPECIAL_TOKENS
    cfg = tokenizer.image_cfg if tokenizer is not None else ImageConfig()
    max_chars = 64 * max_tokens if max_tokens else 0  # no tokenizer makes fewer tokens than 1 per 64 characters
    bad, staged = list(bad), []
    total = len(records) + len(bad)
    for where, rec in records:
        try:
            staged.append((where, rec, *_check_record(rec, where, require, messages, check, specials, max_chars)))
        except ValueError as e:
            bad.append((where, str(e).removeprefix(f"{where}: ")))
        except RecursionError:
            bad.append((where, "nested too deeply"))
    cache = {} if image_cache is None else image_cache
    encoded = {}   # piece text -> its token count (the system prompt and headers repeat in every record)
    good = []
    for where, rec, msgs, images, used in staged:
        try:
            for field, ref in images:
                if not isinstance(ref, str):
                    raise ValueError(f"{field}: must be an image path string, got {type(ref).__name__}")
                p = os.path.normpath(os.path.join(image_root, ref))
                if p not in cache:
                    try:
                        cache[p] = check_image_file(p, max_image_pixels)
                    except ValueError as e:
                        cache[p] = str(e)
                if isinstance(cache[p], str):
                    raise ValueError(f"{field}: {cache[p]}")
                w, h = cache[p]
                try:
                    smart_resize(h, w, cfg.patch_size * cfg.merge_size, cfg.min_pixels, cfg.max_pixels)
                except ValueError as e:
                    raise ValueError(f"{field}: image {ref}: {e}") from None
            if tokenizer is not None and max_tokens:
                n = 0
                for ref in used:   # each <|image_pad|> becomes this image's count of merged patches
                    w, h = cache[os.path.normpath(os.path.join(image_root, ref))]
                    rh, rw = smart_resize(h, w, cfg.patch_size * cfg.merge_size, cfg.min_pixels, cfg.max_pixels)
                    n += rh * rw // (cfg.patch_size * cfg.merge_size) ** 2 - 1
                for text, _ in _chat_pieces(msgs, add_generation_prompt, where):   # as encode_messages tokenizes
                    if text not in encoded:
                        encoded[text] = len(tokenizer.encode(text))
                    n += encoded[text]
                if n > max_tokens:
                    raise ValueError(f"field 'messages': {n} tokens (text and images), over the cap of {max_tokens}")
            good.append((where, rec))
        except ValueError as e:
            bad.append((where, str(e).removeprefix(f"{where}: ")))
    bad.sort(key=lambda b: line_of(b[0]))
    if bad and (not skip_bad or not good):
        raise BadRecords(path, bad, total, usable=bool(good))
    if bad and not quiet:
        first = "; ".join(f"{w}: {r}" for w, r in bad[:3])
        print(f"{prog + ': ' if prog else ''}{path}: skipped {len(bad)} bad record(s) of {total} "
              f"(--skip_bad_records): {first}{' ...' if len(bad) > 3 else ''}", file=sys.stderr, flush=True)
    return good, bad


def line_of(where):
    """Sort key of "file:LINE" (anything else sorts last, in order)."""
    head, _, line = where.rpartition(":")
    return (0, head, int(line)) if line.isdigit() else (1, "", 0)


def load_jsonl_validated(path, tokenizer=None, **kw):
    """read_jsonl_numbered + validate_records: a line that is not JSON is a bad record like the rest.
    -> (good [(where, record)], bad [(where, reason)]); an empty file raises ValueError."""
    errors = []
    records = read_jsonl_numbered(path, errors=errors)
    if not records and not errors:
        raise ValueError(f"{path}: no records (empty file)")
    return validate_records(records, path, tokenizer, bad=errors, **kw)


# -----------------------------------------------------------------------------
# RL prompts (grpo.py): records with a ground truth, their encoded prompts, the order of the steps

def load_records(path, tokenizer=None, system_prompt=None, skip_bad=False, prog="", quiet=False, bad=None):
    """Records of a JSONL file, each with 'messages' and 'answer', plus '_where' ("file:LINE", for
    errors) and '_root' (the directory their image paths are relative to). Every record is checked
    here, on every rank, before the first step (validate_records on the prompt encode_prompt makes
    with system_prompt, images and, with a tokenizer, the token cap included; every ground truth
    readable by answers.check_ground_truth): a bad record fails at load, naming file:line, or is
    dropped with skip_bad (bad: a list that receives them, (where, reason)), instead of stopping one
    rank mid-rollout when first drawn."""
    from support import answers

    def ground_truth(r, where):
        answers.check_ground_truth(r["answer"], r.get("options"), where=f"{where}: field 'answer'")
    good, dropped = load_jsonl_validated(path, tokenizer, require=("messages", "answer"), check=ground_truth,
                                         messages=lambda r, where: prompt_messages(r, system_prompt, where),
                                         add_generation_prompt=True, skip_bad=skip_bad, prog=prog, quiet=quiet)
    if bad is not None:
        bad += dropped
    root = os.path.dirname(os.path.abspath(path))
    return [dict(r, _where=where, _root=root) for where, r in good]


def encode_prompt(record, tokenizer, system_prompt):
    """A load_records record -> its encoded prompt (encode_messages with the generation prompt)."""
    msgs = prompt_messages(record, system_prompt)
    return encode_messages(msgs, tokenizer, record["_root"], add_generation_prompt=True, where=record["_where"])


def step_prompts(n_records, step, P, seed):
    """Global record indices of a step: consecutive slices of per-epoch permutations."""
    out, i = [], step * P
    while len(out) < P:
        epoch, j = divmod(i, n_records)
        perm = torch.randperm(n_records, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.append(int(perm[j]))
        i += 1
    return out


def rollout_seed(seed, step, P, rank, world_size):
    """Seed of this rank's first sampler call of a GRPO step (generate_texts uses seed + k for
    call k). A step's calls get seeds in [base, base + P): rank r's start at base + r * P / W and
    number at most P / W, so no two calls of a run share a seed (`rank * 101 + c` did, beyond 101
    prompts per rank), for any step < 1_000_003."""
    return (seed * 1_000_003 + step) * P + rank * (P // world_size)
