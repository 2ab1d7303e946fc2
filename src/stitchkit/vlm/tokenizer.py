"""A word-level Hugging Face tokenizer built from a word list: no downloads, no files.

Every known word is one token. An unknown word falls back to its characters (WordPiece with single
characters and "##"-continuations in the vocabulary), so any ID string such as "ar413" tokenises, its
first letter first. Newlines are tokens (chat templates use them); other whitespace only separates.
The result is a PreTrainedTokenizerFast: it saves with save_pretrained and loads with AutoTokenizer.
"""

from __future__ import annotations

import string
from collections.abc import Iterable, Sequence

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

CHARACTERS = string.ascii_lowercase + string.digits
PUNCTUATION = ".,:;?!'\"()-"

# A ChatML template (Qwen's, as LLaVA-OneVision uses) that renders text items and, for completeness,
# image items as the given placeholder. No system turn: micro models have no use for one.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'text' %}{{ item['text'] }}{% elif item['type'] == 'image' %}IMAGE_PLACEHOLDER{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHAT_SPECIAL_TOKENS = ("<pad>", "<unk>", "<|im_start|>", "<|im_end|>")


def chat_template(image_placeholder: str) -> str:
    return CHAT_TEMPLATE.replace("IMAGE_PLACEHOLDER", image_placeholder)


def word_tokenizer(
    words: Iterable[str],
    special_tokens: Sequence[str] = CHAT_SPECIAL_TOKENS,
    *,
    pad_token: str = "<pad>",
    unk_token: str = "<unk>",
    eos_token: str = "<|im_end|>",
    chat_template: str | None = None,
) -> PreTrainedTokenizerFast:
    """Special tokens first (ids 0..), then the sorted lower-cased words, then characters for the fallback."""
    specials = list(dict.fromkeys([pad_token, unk_token, eos_token, *special_tokens]))
    words = sorted({w.lower() for w in words} - set(specials) - set(CHARACTERS))
    pieces = list(CHARACTERS) + list(PUNCTUATION) + ["##" + c for c in CHARACTERS] + ["\n"]
    vocab = {token: i for i, token in enumerate(dict.fromkeys([*specials, *words, *pieces]))}
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token=unk_token, max_input_chars_per_word=64))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"[^\S\n]+"), behavior="removed"),
            pre_tokenizers.Split(Regex(r"\n"), behavior="isolated"),
            pre_tokenizers.Punctuation(behavior="isolated"),
        ]
    )
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    tokenizer.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=pad_token,
        unk_token=unk_token,
        eos_token=eos_token,
        chat_template=chat_template,
    )
