"""A local BPE tokenizer for the re-ranking task, trained with ``tokenizers`` on the prompt/trace corpus.

Layout of the vocabulary:

- special tokens ``<pad> <eos> <bos> <unk>`` (the same names as :mod:`diffgr2_trl.modeling`) and a spare
  ``<|mask|>`` for block diffusion (registered as the tokenizer's ``mask_token``);
- every semantic-ID level token (``<a_N>``, ``<b_N>``, ``<c_N>``, ``<d_N>``) and attribute token (``<attr_N>``) as
  an added, never-split token: an item ID is always exactly 4 tokens;
- the structural pieces of the completion (``{"explanation": "``, ``", "recommendations": ["``, ``", "``, ``"]}``)
  as added tokens too. JSON escaping guarantees an unescaped ``"`` only occurs in those pieces, so the answer always
  tokenises as ``open, 4 x SID, sep, 4 x SID, ..., close``: a fixed template a block-diffusion model can fill in
  parallel (10 candidates -> 10*4 + 9 + 2 = 51 tokens);
- byte-level BPE for the rest (instruction and explanation text), so nothing is ever unknown.

:func:`encode_prompt_completion` turns prompt/completion rows into training ids as TRL's SFTTrainer would (used by the
SFT data preparation and by the copy-learning loop).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from transformers import PreTrainedTokenizerFast

from diffgr2_trl.rerank.prompts import FORMAT_PIECES, SID_LEVELS

SPECIAL_TOKENS = {"pad_token": "<pad>", "eos_token": "<eos>", "bos_token": "<bos>", "unk_token": "<unk>"}
MASK_TOKEN = "<|mask|>"

# Plain "role: content" turns; the assistant turn ends with <eos> so SFT targets teach the model to stop.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def sid_level_tokens(codebook_sizes: int | Sequence[int] = 256) -> list[str]:
    """All level tokens ``<a_0> ... <d_{K-1}>`` for the given codebook size(s) (one per level or one for all)."""
    sizes = [codebook_sizes] * len(SID_LEVELS) if isinstance(codebook_sizes, int) else list(codebook_sizes)
    if len(sizes) != len(SID_LEVELS):
        raise ValueError(f"Expected {len(SID_LEVELS)} codebook sizes, got {len(sizes)}.")
    return [f"<{level}_{i}>" for level, size in zip(SID_LEVELS, sizes) for i in range(size)]


def attr_tokens(num_attributes: int) -> list[str]:
    """``<attr_0> ... <attr_{n-1}>``."""
    return [f"<attr_{i}>" for i in range(num_attributes)]


def train_rerank_tokenizer(
    texts: Iterable[str],
    sid_tokens: Iterable[str],
    attr_tokens: Iterable[str],
    vocab_size: int = 2048,
    out_dir: str | Path | None = None,
    min_frequency: int = 2,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` and wrap it as an HF fast tokenizer (see the module docstring).

    Args:
        texts: prompts and completions (the more of the real corpus, the shorter the explanations tokenise).
        sid_tokens: every semantic-ID level token that can occur (e.g. :func:`sid_level_tokens`).
        attr_tokens: every attribute token that can occur.
        vocab_size: size of the BPE part (special and added tokens come on top).
        out_dir: when given, ``save_pretrained`` there (reload with ``AutoTokenizer.from_pretrained``).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    added = list(dict.fromkeys([*FORMAT_PIECES, *sid_tokens, *attr_tokens]))
    specials = [*SPECIAL_TOKENS.values(), MASK_TOKEN]

    backend = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    # Added before training so the trainer never sees (and never learns merges inside) SIDs or JSON pieces.
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    backend.add_tokens([AddedToken(t, normalized=False, single_word=False) for t in added])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, mask_token=MASK_TOKEN, **SPECIAL_TOKENS)
    tokenizer.chat_template = CHAT_TEMPLATE
    if out_dir is not None:
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def encode_prompt_completion(prompts: list[str], completions: list[str], tokenizer) -> tuple[list[list[int]], list[list[int]]]:
    """``(input_ids, completion_mask)`` of prompt + completion + EOS rows, as TRL's SFTTrainer would tokenise them.

    A completion that opens with an added token (the answer template, a SID) cannot merge with the prompt's last
    token, so prompt and completion are tokenised apart and concatenated; other rows take the joint tokenisation,
    the completion starting where the tokenised prompt and prompt + completion diverge.
    """
    eos = tokenizer.eos_token or ""
    atoms = tuple(t for t in tokenizer.get_added_vocab() if len(t) > 1)
    completions = [c if c.endswith(eos) else c + eos for c in completions]
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    split = [c.startswith(atoms) for c in completions]

    def ids_of(texts: list[str]) -> list[list[int]]:
        return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []

    tails = iter(ids_of([c for c, ok in zip(completions, split) if ok]))
    joint = iter(ids_of([p + c for p, c, ok in zip(prompts, completions, split) if not ok]))
    ids, masks = [], []
    for p_ids, ok in zip(prompt_ids, split):
        if ok:
            t = next(tails)
            ids.append(p_ids + t)
            masks.append([0] * len(p_ids) + [1] * len(t))
            continue
        f_ids = next(joint)
        n = 0
        while n < min(len(p_ids), len(f_ids)) and p_ids[n] == f_ids[n]:
            n += 1
        ids.append(f_ids)
        masks.append([0] * n + [1] * (len(f_ids) - n))
    return ids, masks
