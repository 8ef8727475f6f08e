"""End to end on a real client: Hugging Face transformers' tiny Llama and Gemma-2 (random
weights from a fixed seed, built from a config: nothing is downloaded) generate greedily with
their own eager attention, then with attention replaced by flashpage over a paged cache whose
pages are in random order and filled with append_paged_kv_cache. Same tokens at every step,
logits within the dtype's tolerance.
"""

import math

import pytest
import torch

import transformers  # a test dependency (CI installs it: .ci/run); missing, the test fails

import flashpage

STEPS = 32
PROMPT = 6
# transformers 5 renames `past_key_values` to `cache`.
_params = __import__("inspect").signature(transformers.LlamaForCausalLM.forward).parameters
CACHE_ARG = "cache" if "cache" in _params else "past_key_values"


class PagedAttention:
    """transformers attention over a flashpage paged cache (batch 1).

    Per call (one layer, one step): the step's new keys and values (the last `s` positions of
    what the model hands over) are appended to this layer's paged cache, then the queries
    attend to the cache through flashpage: the prefill wrapper for the prompt, the decode
    wrapper for each generated token. The model's own cache only supplies the new K/V.
    """

    def __init__(self, num_layers, num_kv_heads, head_dim, dtype, page_size=4, num_pages=24, seed=7):
        g = torch.Generator().manual_seed(seed)
        self.page_size = page_size
        self.pages = torch.randperm(num_pages, generator=g).to(torch.int32)  # the request's page order
        self.caches = [
            torch.full((num_pages, 2, page_size, num_kv_heads, head_dim), float("nan"), dtype=dtype)
            for _ in range(num_layers)
        ]
        self.kv_len = [0] * num_layers
        self.ws = torch.empty(16 << 20, dtype=torch.uint8)
        self.decode = flashpage.BatchDecodeWithPagedKVCacheWrapper(self.ws, "NHD")
        self.prefill = flashpage.BatchPrefillWithPagedKVCacheWrapper(self.ws, "NHD")
        self.calls = {"decode": 0, "prefill": 0}

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                 sliding_window=None, softcap=None, **kwargs):
        layer = module.layer_idx
        b, hq, s, d = query.shape
        assert b == 1
        hkv = key.shape[1]
        start = self.kv_len[layer]
        total = start + s
        npages = (total + self.page_size - 1) // self.page_size
        indptr = torch.tensor([0, npages], dtype=torch.int32)
        indices = self.pages[:npages].contiguous()
        last = torch.tensor([total - (npages - 1) * self.page_size], dtype=torch.int32)
        seq_lens = flashpage.get_seq_lens(indptr, last, self.page_size)
        batch_indices, positions = flashpage.get_batch_indices_positions(
            torch.tensor([0, s], dtype=torch.int32), seq_lens, s
        )
        k_new = key[0, :, -s:, :].transpose(0, 1)  # [s, hkv, d], strided view
        v_new = value[0, :, -s:, :].transpose(0, 1)
        cache = self.caches[layer]
        flashpage.append_paged_kv_cache(k_new, v_new, batch_indices, positions, cache, indices, indptr, last, "NHD")
        self.kv_len[layer] = total
        q = query[0].transpose(0, 1).contiguous()  # [s, hq, d]
        window_left = sliding_window - 1 if sliding_window else -1  # HF: kv > q - sliding_window
        common = dict(window_left=window_left, logits_soft_cap=softcap, sm_scale=scaling,
                      q_data_type=q.dtype, kv_data_type=cache.dtype)
        if s == 1:
            self.decode.plan(indptr, indices, last, hq, hkv, d, self.page_size, **common)
            out = self.decode.run(q, cache)
            self.calls["decode"] += 1
        else:
            qo_indptr = torch.tensor([0, s], dtype=torch.int32)
            self.prefill.plan(qo_indptr, indptr, indices, last, hq, hkv, d, self.page_size, causal=True, **common)
            out = self.prefill.run(q, cache)
            self.calls["prefill"] += 1
        return out.unsqueeze(0), None  # [1, s, hq, d], as eager attention returns


def build(name, dtype):
    torch.manual_seed(0)
    if name == "llama":
        config = transformers.LlamaConfig(
            vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            rope_theta=10000.0,
        )
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.Gemma2Config(
            vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
            sliding_window=8, query_pre_attn_scalar=32, attn_logit_softcapping=2.0,
            final_logit_softcapping=30.0,
        )
        model = transformers.Gemma2ForCausalLM(config)
    # Larger weights than the default init, so attention is far from uniform and the
    # soft-cap and the window change the result.
    with torch.no_grad():
        for mod in model.modules():
            if mod.__class__.__name__.endswith("Attention"):
                for p in (mod.q_proj.weight, mod.k_proj.weight):
                    p.mul_(6.0)
    return model.to(dtype).eval()


def set_attention(model, impl):
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(impl)
    else:  # older transformers
        model.config._attn_implementation = impl


def generate(model, prompt):
    """Greedy decoding, one token per step, with the model's own dynamic cache."""
    cache = transformers.DynamicCache()
    ids = prompt
    tokens, logits = [], []
    with torch.no_grad():
        for step in range(STEPS):
            out = model(input_ids=ids, **{CACHE_ARG: cache}, use_cache=True)
            step_logits = out.logits[0, -1].float()
            tok = int(step_logits.argmax())
            tokens.append(tok)
            logits.append(step_logits)
            ids = torch.tensor([[tok]])
    return tokens, torch.stack(logits)


@pytest.mark.parametrize("name", ["llama", "gemma2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_generation_matches_eager(name, dtype):
    model = build(name, dtype)
    prompt = torch.randint(0, 256, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    set_attention(model, "eager")
    ref_tokens, ref_logits = generate(model, prompt)

    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    paged = PagedAttention(cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim, dtype)
    # (A name with "flash" in it would be taken for a flash-attention kernel by transformers.)
    transformers.AttentionInterface.register("paged_cpu", paged)
    set_attention(model, "paged_cpu")
    tokens, logits = generate(model, prompt)

    # flashpage really ran: every layer once for the prompt and once per generated token.
    assert paged.calls == {"prefill": cfg.num_hidden_layers, "decode": cfg.num_hidden_layers * (STEPS - 1)}
    assert paged.kv_len == [PROMPT + STEPS - 1] * cfg.num_hidden_layers
    if name == "gemma2":
        assert PROMPT + STEPS > 3 * cfg.sliding_window  # the window matters
    assert tokens == ref_tokens, f"first difference at step {next(i for i, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b)}"
    tol = 1e-3 if dtype == torch.float32 else 0.1
    scale = ref_logits.abs().max().item()
    err = (logits - ref_logits).abs().max(dim=1).values  # per step
    assert (err <= tol * max(1.0, scale)).all(), f"logit error per step {err.tolist()} (scale {scale})"
    # The outputs are not trivially equal to a model without attention context.
    assert len(set(ref_tokens)) > 3
