"""The Reference prompt: a learnable text prompt whose features model CLIP's class-preference
bias (method.md §2)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .options import READ_SLOTS
from .text import display_name, tokenize, validate_class_names

NAME_SLOTS = 3  # the first 3 tokens of the class name after start-of-text
#: where the output is read: the end-of-text slot (the project) or the argmax of the name ids (the release)


class ReferencePrompt(nn.Module):
    """``context_length - 4`` learnable token embeddings (73 for CLIP) run through the frozen
    text encoder together with each class name → ``ref`` [C, D] under one global norm.

    Text-encoder input for class c: [start-of-text] + learnable tokens + 3 slots with the first 3
    tokens of the tokenized name (so end-of-text/padding fill the slots of short names). Where the
    output is read (``read_slot``, a release option, docs/deviations.md): ``"eot"`` at the
    end-of-text slot, or at the last slot for names of 3+ tokens; ``"release"`` at the argmax of the
    3 name token ids, as the release does. End-of-text is the largest id, so both agree on names of
    fewer than 3 tokens; on longer names the release reads the slot of the largest word id.
    """

    def __init__(self, clip: nn.Module, names: Sequence[str], read_slot: str = "eot"):
        super().__init__()
        names = validate_class_names(names)
        if read_slot not in READ_SLOTS:
            raise ValueError(f"read_slot must be one of {READ_SLOTS}, got {read_slot!r}.")
        self.read_slot = read_slot
        # A plain attribute, not a submodule: the frozen CLIP belongs to the owning model and must
        # not be saved or counted twice.
        self.__dict__["clip"] = clip
        self.n_ctx = clip.context_length - 1 - NAME_SLOTS
        if self.n_ctx < 1:
            raise ValueError(f"context length {clip.context_length} is too short for a Reference prompt.")
        tok = clip.tokenizer
        # a class with synonyms ('person, people') fills its name slots with its first name only
        ids = tokenize(clip, [display_name(n) for n in names])
        name_ids = ids[:, 1:1 + NAME_SLOTS].clone()
        if read_slot == "release":
            slot = name_ids.argmax(dim=1)  # the first of equal ids, as torch's argmax in the release
        else:
            is_eot = name_ids == tok.eot_token_id
            last = torch.full((len(names),), NAME_SLOTS - 1, dtype=torch.long)
            slot = torch.where(is_eot.any(dim=1), is_eot.int().argmax(dim=1).long(), last)
        self.register_buffer("name_ids", name_ids, persistent=False)
        self.register_buffer("read_index", 1 + self.n_ctx + slot.long(), persistent=False)
        self.register_buffer("sot_id", torch.tensor([tok.sot_token_id]), persistent=False)
        emb0 = clip.token_embedding.weight[0].detach().clone()  # CLIP's token id 0, as in the release
        self.tokens = nn.Parameter(emb0.unsqueeze(0).repeat(self.n_ctx, 1))

    @property
    def num_classes(self) -> int:
        return self.name_ids.shape[0]

    def encode(self) -> torch.Tensor:
        """Unnormalised text features of the Reference prompt with each class name, [C, D]."""
        clip = self.clip
        C = self.num_classes
        embed = clip.token_embedding
        dtype = clip.transformer.get_cast_dtype()
        sot = embed(self.sot_id).expand(C, -1).unsqueeze(1)
        ctx = self.tokens.unsqueeze(0).expand(C, -1, -1)
        name = embed(self.name_ids)
        x = torch.cat([sot, ctx.to(sot.dtype), name], dim=1).to(dtype)
        x = x + clip.positional_embedding.to(dtype)
        x = clip.transformer(x, attn_mask=clip.attn_mask)
        x = clip.ln_final(x)
        x = x[torch.arange(C, device=x.device), self.read_index]
        proj = clip.text_projection
        if proj is None:
            return x
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj

    def forward(self) -> torch.Tensor:
        """``ref`` [C, D] divided by the norm of the whole matrix (release behaviour; per-row
        normalisation would change the bias magnitudes)."""
        ref = self.encode()
        return ref / ref.norm()
