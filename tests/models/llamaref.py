"""A decoder in the style of Meta's reference Llama code (llama/model.py), cut to the attention path.

The KV cache is two buffers in token-major layout [B, max_seq, H_kv, D], written by slice assignment at a
Python-int start position (`cache_k[:, start_pos : start_pos + T] = xk`), and attention reads the prefix
`cache_k[:, : start_pos + T]`. Attention is spelled out (matmul, scale, additive mask, softmax, matmul) after
a GQA head repeat, as the reference code does; the mask is None for one new token.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn


def repeat_kv(x, n_rep):
    bs, slen, n_kv, hd = x.shape
    if n_rep == 1:
        return x
    return x[:, :, :, None, :].expand(bs, slen, n_kv, n_rep, hd).reshape(bs, slen, n_kv * n_rep, hd)


class Attention(nn.Module):
    def __init__(self, dim, n_head, n_kv_head, batch, max_seq):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, dim // n_head
        self.wq = nn.Linear(dim, n_head * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_head * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_head * self.head_dim, bias=False)
        self.wo = nn.Linear(n_head * self.head_dim, dim, bias=False)
        shape = (batch, max_seq, n_kv_head, self.head_dim)
        self.register_buffer("cache_k", torch.zeros(shape), persistent=False)
        self.register_buffer("cache_v", torch.zeros(shape), persistent=False)

    def forward(self, x, start_pos, mask):
        bsz, seqlen, _ = x.shape
        xq = self.wq(x).view(bsz, seqlen, self.n_head, self.head_dim)
        xk = self.wk(x).view(bsz, seqlen, self.n_kv_head, self.head_dim)
        xv = self.wv(x).view(bsz, seqlen, self.n_kv_head, self.head_dim)
        self.cache_k[:, start_pos : start_pos + seqlen] = xk
        self.cache_v[:, start_pos : start_pos + seqlen] = xv
        keys = repeat_kv(self.cache_k[:, : start_pos + seqlen], self.n_head // self.n_kv_head)
        values = repeat_kv(self.cache_v[:, : start_pos + seqlen], self.n_head // self.n_kv_head)
        xq, keys, values = xq.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)
        scores = torch.matmul(xq, keys.transpose(2, 3)) / math.sqrt(self.head_dim)
        if mask is not None:
            scores = scores + mask
        scores = F.softmax(scores.float(), dim=-1).type_as(xq)
        out = torch.matmul(scores, values)
        return self.wo(out.transpose(1, 2).contiguous().view(bsz, seqlen, -1))


class LlamaRef(nn.Module):
    def __init__(self, vocab=64, dim=32, n_layer=2, n_head=4, n_kv_head=2, batch=1, max_seq=32):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(Attention(dim, n_head, n_kv_head, batch, max_seq) for _ in range(n_layer))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(n_layer))
        self.norm, self.out = nn.LayerNorm(dim), nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens, start_pos: int):
        _, seqlen = tokens.shape
        h = self.tok(tokens)
        mask = None
        if seqlen > 1:
            mask = torch.full((seqlen, seqlen), float("-inf"), device=tokens.device).triu(1)
            mask = torch.hstack([torch.zeros((seqlen, start_pos), device=tokens.device), mask])
        for attn, norm in zip(self.layers, self.norms):
            h = h + attn(norm(h), start_pos, mask)
        return self.out(self.norm(h)).float()
