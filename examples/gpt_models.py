"""GPT models of the families swap_input_embeddings knows that no package ships, small enough to
build anywhere: the LLMs-from-scratch GPTModel and the two KV-cache variants of its
ch04/03_kv-cache scripts, nanoGPT's GPT and minGPT's GPT. Each keeps its project's attribute
names, forward signature, positions and blocks' calling convention; the internals (attention,
blocks) are our own. Used by train_gpt2.py and by the test suite (which also tests the classes
the llms-from-scratch package ships)."""
import torch
import torch.nn.functional as F
from torch import nn


class CausalSelfAttention(nn.Module):
    def __init__(self, dim, heads, dropout, kv_cache=False):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout
        self.kv_cache = kv_cache
        self.reset_cache()

    def reset_cache(self):
        self.cache_k = self.cache_v = None

    def forward(self, x, use_cache=False):
        batch, seq_len, dim = x.shape
        q, k, v = self.qkv(x).view(batch, seq_len, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        causal = True
        if use_cache:
            if self.cache_k is not None:
                k, v = torch.cat([self.cache_k, k], 2), torch.cat([self.cache_v, v], 2)
                causal = seq_len > 1  # one new token attends to everything cached
            self.cache_k, self.cache_v = k, v
            if causal and k.shape[2] != seq_len:
                raise NotImplementedError("chunked prefill is not needed by these tests")
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(batch, seq_len, dim))


class Block(nn.Module):
    def __init__(self, dim, heads, dropout):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.att = CausalSelfAttention(dim, heads, dropout)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x, use_cache=False):
        x = x + self.drop(self.att(self.norm1(x), use_cache=use_cache))
        return x + self.drop(self.ff(self.norm2(x)))


class GPTModel(nn.Module):
    """LLMs-from-scratch layout: tok_emb, pos_emb, drop_emb, trf_blocks, final_norm, out_head."""

    def __init__(self, vocab_size=61, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.1):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab_size, emb_dim)
        self.pos_emb = nn.Embedding(context_length, emb_dim)
        self.drop_emb = nn.Dropout(drop_rate)
        self.trf_blocks = nn.Sequential(*[Block(emb_dim, n_heads, drop_rate) for _ in range(n_layers)])
        self.final_norm = nn.LayerNorm(emb_dim)
        self.out_head = nn.Linear(emb_dim, vocab_size, bias=False)

    def forward(self, in_idx):
        seq_len = in_idx.shape[1]
        x = self.tok_emb(in_idx) + self.pos_emb(torch.arange(seq_len, device=in_idx.device))
        x = self.drop_emb(x)
        x = self.trf_blocks(x)
        return self.out_head(self.final_norm(x))


class GPTModelKV(GPTModel):
    """gpt_with_kv_cache.py's layout: blocks in a ModuleList called with use_cache, positions continuing
    from the counter current_pos when use_cache=True."""

    counter = "current_pos"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.trf_blocks = nn.ModuleList(list(self.trf_blocks))
        setattr(self, self.counter, 0)

    def forward(self, in_idx, use_cache=False):
        batch_size, seq_len = in_idx.shape
        if use_cache:
            start = getattr(self, self.counter)
            pos_ids = torch.arange(start, start + seq_len, device=in_idx.device)
            setattr(self, self.counter, start + seq_len)
        else:
            pos_ids = torch.arange(0, seq_len, device=in_idx.device)
        x = self.drop_emb(self.tok_emb(in_idx) + self.pos_emb(pos_ids).unsqueeze(0))
        for block in self.trf_blocks:
            x = block(x, use_cache=use_cache)
        return self.out_head(self.final_norm(x))

    def reset_kv_cache(self):
        for block in self.trf_blocks:
            block.att.reset_cache()
        setattr(self, self.counter, 0)


class GPTModelKVOptimized(GPTModelKV):
    """gpt_with_kv_cache_optimized.py's layout: the same, the counter named ptr_current_pos."""

    counter = "ptr_current_pos"


def generate_with_cache(model, idx, new_tokens):
    """Greedy decoding through the KV cache, one token at a time after the prompt."""
    model.reset_kv_cache()
    logits = model(idx, use_cache=True)
    for _ in range(new_tokens):
        next_id = logits[:, -1].argmax(-1, keepdim=True)
        idx = torch.cat([idx, next_id], dim=1)
        logits = model(next_id, use_cache=True)
    return idx


class NanoConfig:
    def __init__(self, vocab_size=61, block_size=16, n_embd=32, n_head=4, n_layer=2, dropout=0.1):
        self.vocab_size, self.block_size, self.n_embd = vocab_size, block_size, n_embd
        self.n_head, self.n_layer, self.dropout = n_head, n_layer, dropout


class NanoGPT(nn.Module):
    """nanoGPT layout: transformer.{wte, wpe, drop, h, ln_f}, lm_head tied to wte."""

    def __init__(self, config=None):
        super().__init__()
        self.config = config = config or NanoConfig()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config.n_embd, config.n_head, config.dropout) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying

    def forward(self, idx, targets=None):
        seq_len = idx.shape[1]
        assert seq_len <= self.config.block_size
        pos = torch.arange(0, seq_len, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if targets is not None:
            logits = self.lm_head(x)
            return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return self.lm_head(x[:, [-1], :]), None

    @torch.no_grad()
    def generate(self, idx, max_new_tokens):
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.config.block_size:])
            idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        return idx


class MinGPT(nn.Module):
    """minGPT layout: transformer.{wte, wpe, drop, h, ln_f}, lm_head, block_size as an attribute;
    logits for every position, (logits, loss) with ignore_index=-1."""

    def __init__(self, config=None):
        super().__init__()
        config = config or NanoConfig()
        self.block_size = config.block_size
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config.n_embd, config.n_head, config.dropout) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)

    def forward(self, idx, targets=None):
        b, t = idx.size()
        assert t <= self.block_size, f"Cannot forward sequence of length {t}, block size is only {self.block_size}"
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device).unsqueeze(0)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens):
        for _ in range(max_new_tokens):
            logits, _ = self(idx if idx.size(1) <= self.block_size else idx[:, -self.block_size:])
            idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        return idx
