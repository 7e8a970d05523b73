"""A nanoGPT style decoder (after karpathy/nanoGPT model.py) extended with a returned KV cache.

Each block concatenates its past keys/values (`torch.cat([past_k, k], dim=-2)`) and returns them as the
"present", so the caller threads `(logits, ((k, v), ...))` through decode steps. Attention is either
`F.scaled_dot_product_attention` (is_causal without a past, an explicit boolean mask with one) or
nanoGPT's manual path: `q @ k.transpose(-2, -1) * (1/sqrt(d))`, `masked_fill` with a causal buffer,
softmax, `@ v`.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn


class CausalSelfAttention(nn.Module):
    def __init__(self, dim, n_head, block_size, flash):
        super().__init__()
        self.n_head, self.flash = n_head, flash
        self.c_attn = nn.Linear(dim, 3 * dim)
        self.c_proj = nn.Linear(dim, dim)
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size))

    def forward(self, x, past=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if past is not None:
            k = torch.cat([past[0], k], dim=-2)
            v = torch.cat([past[1], v], dim=-2)
        L = k.size(-2)
        if self.flash and past is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif self.flash:
            mask = torch.ones(T, L, dtype=torch.bool, device=x.device).tril(diagonal=L - T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            att = att.masked_fill(self.bias[:, :, L - T : L, :L] == 0, float("-inf"))
            y = F.softmax(att, dim=-1) @ v
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C)), (k, v)


class NanoGPT(nn.Module):
    def __init__(self, vocab=64, dim=32, n_layer=2, n_head=4, block_size=32, flash=True):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, dim), nn.Embedding(block_size, dim)
        self.ln = nn.ModuleList(nn.LayerNorm(dim) for _ in range(n_layer))
        self.attn = nn.ModuleList(CausalSelfAttention(dim, n_head, block_size, flash) for _ in range(n_layer))
        self.ln_f, self.lm_head = nn.LayerNorm(dim), nn.Linear(dim, vocab, bias=False)

    def forward(self, idx, past=None):
        start = 0 if past is None else past[0][0].size(-2)
        pos = torch.arange(start, start + idx.size(1), device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        presents = []
        for i, (ln, attn) in enumerate(zip(self.ln, self.attn)):
            y, present = attn(ln(x), None if past is None else past[i])
            x = x + y
            presents.append(present)
        return self.lm_head(self.ln_f(x)), tuple(presents)
