"""A gpt-fast style decoder (after pytorch-labs/gpt-fast model.py, cut to the attention path).

The KV cache is two registered buffers [B, H_kv, max_len, D] written by index
(`k_cache[:, :, input_pos] = k`); attention is SDPA over the full buffers with a boolean causal
mask sliced from a buffer; GQA through `repeat_interleave`, as gpt-fast does.
"""
import torch
import torch.nn.functional as F
from torch import nn


class KVCache(nn.Module):
    def __init__(self, batch, n_kv_heads, max_len, head_dim, dtype=torch.float32):
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype), persistent=False)

    def update(self, input_pos, k, v):
        k_out, v_out = self.k_cache, self.v_cache
        k_out[:, :, input_pos] = k
        v_out[:, :, input_pos] = v
        return k_out, v_out


class Attention(nn.Module):
    def __init__(self, dim, n_head, n_kv_head, batch, max_len):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, dim // n_head
        self.wqkv = nn.Linear(dim, (n_head + 2 * n_kv_head) * self.head_dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.kv_cache = KVCache(batch, n_kv_head, max_len, self.head_dim)

    def forward(self, x, mask, input_pos):
        bsz, seqlen, _ = x.shape
        kv_size = self.n_kv_head * self.head_dim
        q, k, v = self.wqkv(x).split([self.n_head * self.head_dim, kv_size, kv_size], dim=-1)
        q = q.view(bsz, seqlen, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(bsz, seqlen, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = v.view(bsz, seqlen, self.n_kv_head, self.head_dim).transpose(1, 2)
        k, v = self.kv_cache.update(input_pos, k, v)
        k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0)
        return self.wo(y.transpose(1, 2).contiguous().view(bsz, seqlen, -1))


class GPTFast(nn.Module):
    def __init__(self, vocab=64, dim=32, n_layer=2, n_head=4, n_kv_head=2, batch=1, max_len=32):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(Attention(dim, n_head, n_kv_head, batch, max_len) for _ in range(n_layer))
        self.mlps = nn.ModuleList(nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim)) for _ in range(n_layer))
        self.norm, self.out = nn.LayerNorm(dim), nn.Linear(dim, vocab, bias=False)
        causal = torch.tril(torch.ones(max_len, max_len, dtype=torch.bool))
        self.register_buffer("causal_mask", causal, persistent=False)

    def forward(self, idx, input_pos):
        mask = self.causal_mask[None, None, input_pos]
        x = self.tok(idx)
        for attn, mlp in zip(self.layers, self.mlps):
            x = x + attn(x, mask, input_pos)
            x = x + mlp(x)
        return self.out(self.norm(x))
