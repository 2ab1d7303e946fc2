"""What the mechanistic analysis runs on: our binding model, or any Hugging Face causal LM / VLM (text only).

A Subject turns a task Example into token ids and names the token of every candidate item, and exposes the
residual stream: `sites` are the decoder layers followed by the final norm, whose first input is the residual
stream entering block l (resid_pre, l = 0..L-1) and leaving the last block (resid_post, l = L).

Natural-language prompts (binding.md §8) for pretrained models, one word per symbol:
    "Objects: red triangle, blue circle. Items: the circle has Book. the triangle has Apple. Question: the item
     of the shape that is red"        -> " Apple"
so the last token is the query colour, as in the token format. Words must be single tokens (with their leading
space) under the model's tokenizer, and that token theirs alone (not the unknown token, not shared with another
word of the lists); words that are not are dropped, and too few left is an error.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from stitchkit.binding.task import Example, Vocabulary, encode_text
from stitchkit.errors import ConfigError, IncompatibleError, InputError

COLOUR_WORDS = (
    "red", "blue", "green", "yellow", "purple", "orange", "pink", "brown", "black", "white", "gray", "gold",
    "silver", "cyan", "violet", "beige", "maroon", "navy", "olive", "teal", "lime", "coral", "indigo", "ivory",
)  # fmt: skip
SHAPE_WORDS = (
    "circle", "square", "triangle", "star", "heart", "cross", "ring", "cube", "cone", "arrow", "diamond", "oval",
    "hexagon", "pentagon", "sphere", "pyramid", "crescent", "spiral", "rectangle", "cylinder", "octagon", "disk",
    "wedge", "prism",
)  # fmt: skip
ITEM_WORDS = (
    "Apple", "Book", "Chair", "Door", "Egg", "Fish", "Glass", "Hat", "Ink", "Jar", "Key", "Lamp", "Map", "Nail",
    "Orange", "Pen", "Quilt", "Rope", "Shoe", "Table", "Umbrella", "Vase", "Watch", "Box",
)  # fmt: skip


def text_model(model: nn.Module) -> nn.Module:
    """The decoder stack inside an LM or VLM: the module holding `layers` (a ModuleList) and a final `norm`."""
    for module in model.modules():
        layers = getattr(module, "layers", None)
        if isinstance(layers, nn.ModuleList) and isinstance(getattr(module, "norm", None), nn.Module) and hasattr(module, "embed_tokens"):
            return module
    raise IncompatibleError(f"{type(model).__name__}: found no decoder stack (a module with layers, norm and embed_tokens)")


def residual_sites(model: nn.Module) -> list[nn.Module]:
    stack = text_model(model)
    return [*stack.layers, stack.norm]


@dataclass
class Subject(ABC):
    """A model with a prompt format. `forward(ids, **kwargs)` returns logits (B, S, V)."""

    model: nn.Module
    vocab: Vocabulary  # sizes of the colour, shape and item sets examples are drawn from
    name: str = "model"
    train_objects: tuple[int, int] | None = None  # the context sizes it was trained on, when known (our models)
    sites: list[nn.Module] = field(init=False)

    def __post_init__(self):
        self.sites = residual_sites(self.model)

    @property
    def layers(self) -> int:
        return len(self.sites) - 1

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def vocabulary_counts(self) -> str:
        """Where the largest context size comes from, for a refusal."""
        v = self.vocab
        return f"its vocabulary has {v.colours} colours, {v.shapes} shapes and {v.items} items"

    @abstractmethod
    def encode(self, ex: Example) -> list[int]:
        """The token ids of the example's text prompt; its last token is the query colour."""

    @abstractmethod
    def item_token(self, item: int) -> int:
        """The token the answer `item` is predicted as."""

    @abstractmethod
    def shape_positions(self, ex: Example) -> list[int]:
        """Index of each object's shape in the context (the last token of the shape word)."""

    @abstractmethod
    def forward(self, ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """Logits (B, S, V) of unpadded prompts of equal length."""


class TokenSubject(Subject):
    """Our binding model on the token format of task.py."""

    def encode(self, ex: Example) -> list[int]:
        return encode_text(ex, self.vocab).input_ids

    def item_token(self, item: int) -> int:
        return self.vocab.item(item)

    def shape_positions(self, ex: Example) -> list[int]:
        return encode_text(ex, self.vocab).shape_pos

    def forward(self, ids: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.model.run(ids, **kwargs).logits


class WordSubject(Subject):
    """A pretrained causal LM or VLM, run on natural-language prompts without images."""

    def __init__(self, model: nn.Module, tokenizer, name: str = "model", chat_template: bool = False):
        self.tokenizer = tokenizer
        self.turn_prefix = _user_turn_prefix(tokenizer, name) if chat_template else None
        self.colour_words, self.shape_words, self.item_words = _single_tokens(tokenizer, (COLOUR_WORDS, SHAPE_WORDS, ITEM_WORDS))
        vocab = Vocabulary(len(self.colour_words), len(self.shape_words), len(self.item_words))
        super().__init__(model, vocab, name)

    @property
    def vocabulary_counts(self) -> str:
        v = self.vocab
        return f"{v.colours} colour, {v.shapes} shape and {v.items} item words are single tokens of their own under its tokenizer"

    def _pieces(self, ex: Example) -> list[tuple[str, str]]:
        """The prompt as (text, role) pieces; role 'shape<i>' marks object i's shape word in the context."""
        pieces = [("Objects:", "")]
        for i in range(ex.n):
            pieces += [(f" {self.colour_words[ex.colours[i]]}", ""), (f" {self.shape_words[ex.shapes[i]]}", f"shape{i}")]
            pieces.append(("," if i < ex.n - 1 else ".", ""))
        pieces.append((" Items:", ""))
        for i in ex.order:
            pieces.append((f" the {self.shape_words[ex.shapes[i]]} has {self.item_words[ex.items[i]]}.", ""))
        pieces.append((f" Question: the item of the shape that is {self.colour_words[ex.colours[ex.query]]}", ""))
        return pieces

    def _tokens(self, ex: Example) -> tuple[list[int], list[int]]:
        ids, shape_at = [], [0] * ex.n
        bos = self.tokenizer.bos_token_id
        if self.turn_prefix is not None:  # the template writes any BOS itself
            ids += self.turn_prefix
        elif bos is not None and getattr(self.tokenizer, "add_bos_token", True):
            ids.append(bos)
        for text, role in self._pieces(ex):
            ids += self.tokenizer.encode(text, add_special_tokens=False)
            if role:
                shape_at[int(role[5:])] = len(ids) - 1
        return ids, shape_at

    def encode(self, ex: Example) -> list[int]:
        return self._tokens(ex)[0]

    def shape_positions(self, ex: Example) -> list[int]:
        return self._tokens(ex)[1]

    def item_token(self, item: int) -> int:
        return self.tokenizer.encode(f" {self.item_words[item]}", add_special_tokens=False)[0]

    def forward(self, ids: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.model(input_ids=ids, **kwargs).logits


def _user_turn_prefix(tokenizer, name: str) -> list[int]:
    """The chat template's tokens before a user message's text (a default system turn, the user header). The
    prompt then runs inside the user turn, in the model's own format (§8), and its last token is still the query
    colour, where §7.1 patches and reads; no end of turn or assistant header follows it."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"{name}: its tokenizer has no chat template (drop --chat-template)")
    marker = "QUERYTEXTHERE"
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False, add_generation_prompt=False)
    return tokenizer.encode(text.split(marker)[0], add_special_tokens=False)


def _single_tokens(tokenizer, word_lists: tuple[tuple[str, ...], ...]) -> list[list[str]]:
    """The words of each list that the tokenizer encodes (with their leading space) as one token of their own: not
    its unknown token (a word it lacks), and not a token another word of the lists also encodes to (a lowercasing
    tokenizer reads colour "orange" and item "Orange" alike). Any such word would make two symbols one."""
    ids = {w: tokenizer.encode(f" {w}", add_special_tokens=False) for words in word_lists for w in words}
    single = {w: t[0] for w, t in ids.items() if len(t) == 1 and t[0] != tokenizer.unk_token_id}
    owners = Counter(single.values())
    kept = [[w for w in words if w in single and owners[single[w]] == 1] for words in word_lists]
    for words, mine in zip(word_lists, kept):
        if len(mine) < 4:
            raise InputError(f"the tokenizer encodes only {len(mine)} of {words[:6]}... as single tokens of their own; need at least 4")
    return kept


def load_subject(spec: str, device: str | None = None, chat_template: bool = False, trust_remote_code: bool = False) -> Subject:
    """A binding model folder (written by `stitchkit binding run`), or a hub id / folder of a causal LM or VLM
    (`chat_template`: its prompts inside the user turn of the model's template; `trust_remote_code`: passed to
    every from_pretrained, for checkpoints whose config, model or tokenizer class transformers lacks)."""
    from stitchkit.binding.model import is_binding_model, load_binding_model
    from stitchkit.vlm.micro import is_micro_spec
    from stitchkit.zoo import list_recipes

    if is_micro_spec(spec):
        if spec.partition(":")[2] in list_recipes():
            raise ConfigError(f"{spec!r} is a vision encoder of the micro zoo, with no language model; analyze a binding "
                              "model folder (written by `stitchkit binding run`) or a causal LM / VLM")
        raise ConfigError(f"{spec!r} names the micro VLM, whose word vocabulary has no words for the binding prompts; "
                          "analyze a binding model folder (written by `stitchkit binding run`) or a hub LM / VLM")
    if is_binding_model(spec):
        if chat_template:
            raise ConfigError(f"{spec}: a binding model reads token sequences, not chat turns (drop --chat-template)")
        model, meta = load_binding_model(spec)
        trained = tuple(meta["train_objects"]) if meta.get("train_objects") else None
        return TokenSubject(model.to(device or "cpu"), model.vocab, name=str(spec), train_objects=trained)
    _refuse_run_folder(Path(spec))
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    from stitchkit.backbones.loading import from_hub  # cache first, then the hub; one clear error
    from stitchkit.vlm.loading import load_tokenizer

    remote = {"trust_remote_code": True} if trust_remote_code else {}
    config = from_hub(spec, lambda **kw: AutoConfig.from_pretrained(spec, **remote, **kw))
    loader = AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModelForCausalLM
    tokenizer = load_tokenizer(spec, trust_remote_code)
    model = from_hub(spec, lambda **kw: loader.from_pretrained(spec, attn_implementation="sdpa", **remote, **kw))
    return WordSubject(model.to(device or "cpu").eval(), tokenizer, name=spec, chat_template=chat_template)


def _refuse_run_folder(folder: Path) -> None:
    """A binding run folder, or a seed or stage folder in it, holds models but is none: say which folder to pass."""
    from stitchkit.binding.model import META

    if (folder / "model" / META).is_file():
        raise ConfigError(f"{folder} is a stage folder of a binding run, not a model: pass its model folder, {folder / 'model'}")
    looks_like_run = (folder / "manifest.json").is_file() or (folder / "train").is_dir() or folder.name.startswith("seed")
    if folder.is_dir() and looks_like_run and not (folder / "config.json").is_file():
        models = sorted(str(p.parent) for p in folder.glob(f"**/model/{META}"))
        if models:
            more = f" ({len(models)} in all)" if len(models) > 3 else ""
            raise ConfigError(f"{folder} is a binding run folder (or part of one), not a model: pass one of its model "
                              f"folders, train/seed<s>/<stage>/.../model, e.g. {', '.join(models[:3])}{more}")


# ---- the residual stream: read it, or overwrite it at the last token ------------------------------------


def _hidden_of(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


@torch.no_grad()
def capture_residuals(subject: Subject, ids: torch.Tensor, **forward_kwargs) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The residual stream at every site (L + 1 tensors (B, S, d): resid_pre of each block, then resid_post)
    and the logits at the last position. `forward_kwargs` go to the subject's forward (e.g. attention_knockout)."""
    stored: list[torch.Tensor] = []
    hooks = [site.register_forward_pre_hook(lambda m, a, k: stored.append(_hidden_of(a, k).detach()), with_kwargs=True) for site in subject.sites]
    try:
        logits = subject.forward(ids.to(subject.device), **forward_kwargs)[:, -1]
    finally:
        for hook in hooks:
            hook.remove()
    return stored, logits


@torch.no_grad()
def forward_patched(subject: Subject, ids: torch.Tensor, site: int, last_token_values: torch.Tensor, **forward_kwargs) -> torch.Tensor:
    """Logits at the last position when the residual stream entering `site` is overwritten at the last token.
    `forward_kwargs` go to the subject's forward (e.g. attention_knockout)."""

    def patch(module, args, kwargs):
        hidden = _hidden_of(args, kwargs).clone()
        hidden[:, -1] = last_token_values.to(hidden.dtype)
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    hook = subject.sites[site].register_forward_pre_hook(patch, with_kwargs=True)
    try:
        return subject.forward(ids.to(subject.device), **forward_kwargs)[:, -1]
    finally:
        hook.remove()
