import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from gptlab.errors import UserError
from gptlab.models import GPT, GPTConfig
from gptlab.models.gpt import SelfAttention, reference_attention

TINY = dict(vocab_size=17, block_size=16, n_layer=2, n_head=2, n_embd=16)
VARIANTS = [
    dict(pos_emb="learned", norm="layernorm", mlp="gelu"),
    dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu"),
    dict(pos_emb="rope", norm="layernorm", mlp="gelu"),
    dict(pos_emb="learned", norm="rmsnorm", mlp="swiglu"),
]


def tiny_model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**TINY, **overrides})).eval()


def peaked_model(pos_emb: str, seed: int = 0) -> GPT:
    """A random model with large weights, so greedy decoding depends on content and position
    rather than settling on one token, and near-ties between logits are unlikely."""
    model = tiny_model(seed, pos_emb=pos_emb)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    return model


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(v.values()))
def test_future_tokens_do_not_change_past_logits(variant):
    model = tiny_model(**variant)
    idx = torch.randint(0, 17, (2, 12))
    logits = model(idx)
    for t in range(11):
        changed = idx.clone()
        changed[:, t + 1] = (changed[:, t + 1] + 1) % 17
        new_logits = model(changed)
        torch.testing.assert_close(new_logits[:, : t + 1], logits[:, : t + 1])
        assert not torch.allclose(new_logits[:, t + 1], logits[:, t + 1])


def _heads(attn: SelfAttention, x: torch.Tensor):
    B, T, C = x.shape
    return [
        z.view(B, T, attn.n_head, C // attn.n_head).transpose(1, 2)
        for z in attn.c_attn(x).split(C, dim=2)
    ]


def test_sdpa_attention_matches_reference():
    torch.manual_seed(0)
    attn = SelfAttention(GPTConfig(**TINY, dropout=0.0)).train()  # dropout 0 in training
    x = torch.randn(3, 10, 16)
    q, k, v = _heads(attn, x)
    expected = attn.c_proj(reference_attention(q, k, v).transpose(1, 2).reshape(3, 10, 16))
    torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-6)


def test_masked_attention_matches_reference():
    torch.manual_seed(0)
    attn = SelfAttention(GPTConfig(**TINY)).eval()
    x = torch.randn(2, 6, 16)
    padding = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    mask = GPT._attention_mask(padding, T=6, past=0, device=x.device)
    q, k, v = _heads(attn, x)
    expected = attn.c_proj(reference_attention(q, k, v, mask).transpose(1, 2).reshape(2, 6, 16))
    torch.testing.assert_close(attn(x, mask=mask), expected, rtol=1e-5, atol=1e-6)
    # Real queries never look at padding keys.
    assert not mask[0, 0, 2:, :2].any()


def _meta_model(**overrides) -> GPT:
    with torch.device("meta"):  # counts need no real weights, and this skips the init cost
        return GPT(GPTConfig(**overrides))


def test_num_params_matches_nanogpt_shakespeare_char():
    model = _meta_model(vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384)
    assert model.num_params() == 10_646_784
    assert model.num_params(non_embedding=False) == 10_646_784 + 256 * 384


def test_num_params_of_variants():
    base = _meta_model().num_params()
    assert _meta_model(pos_emb="rope").num_params() == base  # only the position table differs
    assert _meta_model(pos_emb="rope").num_params(non_embedding=False) == base
    assert _meta_model(norm="rmsnorm").num_params() == base  # no norm biases with bias=False
    assert _meta_model(norm="rmsnorm", bias=True).num_params() < _meta_model(bias=True).num_params()
    assert _meta_model(mlp="swiglu").num_params() == pytest.approx(base, rel=0.03)
    small = dict(n_embd=128, n_head=4)
    assert _meta_model(mlp="swiglu", **small).num_params() == pytest.approx(
        _meta_model(**small).num_params(), rel=0.1
    )
    assert _meta_model(mlp_hidden=100).num_params() < base


def test_flops_per_token_matches_nanogpt_estimate():
    model = _meta_model(vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384)
    # nanoGPT's estimate_mfu: 6N + 12 L H Q T with N = 10,646,784, L=6, H=6, Q=64, T=256.
    assert model.flops_per_token() == 70_958_592
    assert model.flops_per_token(seq_len=0) == 6 * 10_646_784


def test_tied_weights_share_one_tensor():
    model = tiny_model()
    assert model.lm_head.weight is model.wte.weight
    untied = tiny_model(tie_weights=False)
    assert untied.lm_head.weight is not untied.wte.weight
    assert untied.num_params(non_embedding=False) - model.num_params(non_embedding=False) == 17 * 16


def test_gpt2_init_scales_residual_projections():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=8, n_head=4, n_embd=256))
    residual_std = 0.02 / math.sqrt(2 * 8)
    for block in model.blocks:
        assert block.attn.c_proj.weight.std().item() == pytest.approx(residual_std, rel=0.05)
        assert block.mlp.c_proj.weight.std().item() == pytest.approx(residual_std, rel=0.05)
        assert block.attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.05)
        assert block.mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_config_round_trips_through_a_dict():
    config = GPTConfig(pos_emb="rope", mlp="swiglu", mlp_hidden=96)
    assert GPTConfig(**dataclasses.asdict(config)) == config


PROMPTS = [[1, 2, 3, 4, 5], [7, 3], [9, 9, 1, 0, 4, 2, 8, 8, 3], [4, 5, 6, 7, 8]]


@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
def test_greedy_generation_is_the_same_cached_uncached_batched_and_alone(pos_emb):
    model = peaked_model(pos_emb)
    # block_size 16, 30 new tokens: every row runs well past the context.
    cached = model.generate(PROMPTS, 30, temperature=0)
    uncached = model.generate(PROMPTS, 30, temperature=0, use_cache=False)
    assert cached == uncached
    assert all(len(row) == 30 for row in cached)
    assert len({tuple(row) for row in cached}) > 1  # the rows did not all collapse to one output
    for prompt, row in zip(PROMPTS, cached, strict=True):
        assert model.generate([prompt], 30, temperature=0) == [row]
        assert model.generate([prompt], 30, temperature=0, use_cache=False) == [row]


@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
def test_generation_sees_only_the_last_block_size_tokens(pos_emb):
    model = peaked_model(pos_emb)
    prompt = torch.randint(0, 17, (20,)).tolist()
    # A prompt longer than the context continues like its last block_size tokens.
    assert model.generate([prompt], 5, temperature=0) == model.generate(
        [prompt[-16:]], 5, temperature=0
    )
    expected = model(torch.tensor([prompt[-16:]]))[0, -1].argmax().item()
    assert model.generate([prompt], 1, temperature=0) == [[expected]]


def test_sampling_is_reproducible_with_a_generator():
    model = peaked_model("rope")

    def sample(seed, **kwargs):
        generator = torch.Generator().manual_seed(seed)
        return model.generate(PROMPTS, 12, generator=generator, **kwargs)

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)
    assert sample(1, top_k=3, top_p=0.9) == sample(1, top_k=3, top_p=0.9)
    greedy = model.generate(PROMPTS, 12, temperature=0)
    assert sample(3, top_k=1) == greedy
    assert sample(3, top_p=1e-6) == greedy
    assert sample(3, temperature=1e-4) == greedy


def test_top_k_restricts_sampled_tokens():
    model = peaked_model("learned")
    idx = torch.tensor([PROMPTS[0]])
    top3 = set(model(idx)[0, -1].topk(3).indices.tolist())
    gen = torch.Generator().manual_seed(0)
    firsts = {model.generate([PROMPTS[0]], 1, top_k=3, generator=gen)[0][0] for _ in range(50)}
    assert firsts <= top3 and len(firsts) > 1


def test_stop_token_ends_a_row_and_is_kept():
    model = peaked_model("learned")
    greedy = model.generate(PROMPTS, 12, temperature=0)
    stop = greedy[0][3]
    stopped = model.generate(PROMPTS, 12, temperature=0, stop_token=stop)
    for full, row in zip(greedy, stopped, strict=True):
        expected = full[: full.index(stop) + 1] if stop in full else full
        assert row == expected
    assert stopped[0][-1] == stop and len(stopped[0]) <= 4


def test_generate_restores_training_mode():
    model = tiny_model().train()
    model.generate([[1, 2]], 2)
    assert model.training
    model.eval().generate([[1, 2]], 2)
    assert not model.training


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=17, block_size=16, n_layer=2, n_head=2, n_embd=32))
    x = torch.randint(0, 17, (4, 16))
    y = torch.randint(0, 17, (4, 16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        loss = F.cross_entropy(model(x).view(-1, 17), y.view(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1


def test_return_hidden_gives_final_norm_states():
    model = tiny_model()
    idx = torch.randint(0, 17, (2, 8))
    hidden = model(idx, return_hidden=True)
    assert hidden.shape == (2, 8, 16)
    torch.testing.assert_close(model.lm_head(hidden), model(idx))


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(n_embd=100, n_head=6), "n_head"),
        (dict(pos_emb="alibi"), "pos_emb"),
        (dict(norm="batchnorm"), "norm"),
        (dict(mlp="relu"), "mlp"),
        (dict(n_embd=36, n_head=4, pos_emb="rope"), "head size"),
        (dict(n_layer=0), "n_layer"),
        (dict(norm_eps=0.0), "norm_eps"),
    ],
)
def test_bad_config_raises_user_error(overrides, field):
    with pytest.raises(UserError, match=field):
        GPTConfig(**overrides)


def test_too_long_input_raises_user_error():
    model = tiny_model()
    with pytest.raises(UserError, match="block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(UserError, match="prompt"):
        model.generate([[1], []], 3)


def test_gelu_tanh_uses_the_tanh_approximation():
    exact, approx = tiny_model(mlp="gelu"), tiny_model(mlp="gelu_tanh")
    approx.load_state_dict(exact.state_dict())
    x = torch.randn(2, 5, 16) * 3
    mlp = exact.blocks[0].mlp
    torch.testing.assert_close(
        approx.blocks[0].mlp(x), mlp.c_proj(F.gelu(mlp.c_fc(x), approximate="tanh")))
    assert not torch.allclose(approx.blocks[0].mlp(x), mlp(x))
    assert approx.config.mlp_width == exact.config.mlp_width == 64


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_norm_eps_reaches_every_norm(norm):
    usual = tiny_model(norm=norm)
    assert {m.eps for m in usual.modules() if hasattr(m, "eps")} == {usual.config.norm_epsilon}
    assert usual.config.norm_epsilon == {"layernorm": 1e-5, "rmsnorm": 1e-6}[norm]
    wide = tiny_model(norm=norm, norm_eps=0.5)
    assert {m.eps for m in wide.modules() if hasattr(m, "eps")} == {0.5}
    wide.load_state_dict(usual.state_dict())
    idx = torch.tensor([[1, 2, 3]])
    assert not torch.allclose(wide(idx), usual(idx))


def test_configs_without_the_newer_fields_still_load():
    old = {k: v for k, v in dataclasses.asdict(GPTConfig()).items() if k != "norm_eps"}
    assert GPTConfig(**old).norm_epsilon == 1e-5
