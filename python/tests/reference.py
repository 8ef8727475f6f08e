"""Plain torch attention (float64) for the tests: the semantics FlashInfer documents."""

import math

import torch


def attention(q, k, v, causal=False, window_left=-1, soft_cap=None, sm_scale=None, rope_theta=None, sinks=None, mask=None):
    """q [qo_len, hq, d], k/v [kv_len, hkv, d] of one request -> (o [qo_len, hq, d], lse base 2).
    sinks [hq]: one more logit per head (natural log) with no value (gpt-oss).
    mask [qo_len, kv_len] bool: a custom mask (True: visible), with causal and the window."""
    q, k, v = q.double(), k.double(), v.double()
    qo_len, hq, d = q.shape
    kv_len, hkv, _ = k.shape
    g = hq // hkv
    k = k.repeat_interleave(g, 1)
    v = v.repeat_interleave(g, 1)
    qpos = torch.arange(qo_len, dtype=torch.float64) + kv_len - qo_len
    kpos = torch.arange(kv_len, dtype=torch.float64)
    if rope_theta is not None:
        q = rope(q, qpos, rope_theta)
        k = rope(k, kpos, rope_theta)
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)
    s = torch.einsum("qhd,khd->hqk", q, k) * scale
    if soft_cap is not None:
        s = soft_cap * torch.tanh(s / soft_cap)
    visible = torch.ones(qo_len, kv_len, dtype=torch.bool)
    if causal:
        visible &= kpos[None, :] <= qpos[:, None]
    if window_left >= 0:
        visible &= kpos[None, :] >= qpos[:, None] - window_left
    if mask is not None:
        visible &= mask
    s = s.masked_fill(~visible[None], float("-inf"))
    if sinks is not None:
        col = sinks.double()[:, None, None].expand(hq, qo_len, 1)
        lse = torch.logsumexp(torch.cat([s, col], -1), -1)  # [h, q]
    else:
        lse = torch.logsumexp(s, -1)  # [h, q]
    p = torch.where(torch.isinf(lse)[..., None], torch.zeros_like(s), torch.exp(s - lse[..., None]))
    o = torch.einsum("hqk,khd->qhd", p, v)
    return o, (lse / math.log(2)).T.contiguous()


def rope(x, pos, theta):
    """Rotate-half RoPE (Llama) of x [n, h, d] at positions pos [n]."""
    d = x.shape[-1]
    inv = theta ** (-torch.arange(0, d // 2, dtype=torch.float64) * 2 / d)
    ang = pos[:, None] * inv[None, :]
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]
    a, b = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], -1)
