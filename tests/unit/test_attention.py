"""A decode step's attention through the kernel equals SDPA's to float32 rounding, reads
keys and values in place (strided, masked, grouped heads), and is used only where it applies."""

from __future__ import annotations

import pytest
import torch

from loramux.model import attention, kernels, mixed

ISAS = [isa for isa in ("avx2", "avx512") if kernels.isa() == "avx512" or isa == kernels.isa()]
needs_kernel = pytest.mark.skipif(not ISAS or not kernels.load(), reason="no AVX2 or no C++ compiler: no kernel")


def reference(q, k, v, mask, scale):
    """Attention in float64 through SDPA's math, key/value heads repeated for their query heads."""
    group = q.shape[1] // k.shape[1]
    kk, vv = (t.repeat_interleave(group, 1).double() for t in (k, v))
    m = None if mask is None else mask[:, None, None, :]
    return torch.nn.functional.scaled_dot_product_attention(q[:, :, None].double(), kk, vv, attn_mask=m,
                                                            scale=scale)[:, :, 0]


def inputs(rows, heads, kv_heads, dim, positions, seed=0):
    """q [rows, heads, dim]; k and v views into wider buffers (the batch's live window); a
    mask with left padding and holes, every row attending to its last position."""
    g = torch.Generator().manual_seed(seed)
    kbuf, vbuf = (torch.randn(rows, kv_heads, positions + 24, dim, generator=g) for _ in range(2))
    k, v = kbuf[:, :, 9:9 + positions], vbuf[:, :, 9:9 + positions]
    q = 3 * torch.randn(rows, heads, dim, generator=g)
    mask = torch.rand(rows, positions, generator=g) > 0.3
    mask[:, : positions // 3] = False
    mask[:, -1] = True
    return q, k, v, mask


@needs_kernel
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape", [(32, 9, 3, 64, 40), (3, 12, 2, 64, 300), (5, 8, 8, 128, 17),
                                   (4, 10, 2, 64, 33), (7, 4, 1, 64, 1)])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_equals_attention_to_rounding(isa, shape, masked, threads):
    q, k, v, mask = inputs(*shape)
    mask = mask if masked else None
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = torch.ops.loramux.decode_attention(q, k, v, mask, 0.125, isa == "avx512")
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(got.double(), reference(q, k, v, mask, 0.125), rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("isa", ISAS)
def test_a_rows_result_does_not_depend_on_the_other_rows(isa):
    q, k, v, mask = inputs(6, 9, 3, 64, 50)
    whole = torch.ops.loramux.decode_attention(q, k, v, mask, 0.125, isa == "avx512")
    part = torch.ops.loramux.decode_attention(q[2:4].contiguous(), k[2:4], v[2:4], mask[2:4], 0.125, isa == "avx512")
    assert torch.equal(whole[2:4], part)


@needs_kernel
@pytest.mark.parametrize("isa", ISAS)
def test_a_row_attending_to_nothing_gets_zeros(isa):
    q, k, v, mask = inputs(3, 6, 2, 64, 10)
    mask[1] = False
    got = torch.ops.loramux.decode_attention(q, k, v, mask, 0.125, isa == "avx512")
    assert torch.equal(got[1], torch.zeros_like(got[1]))
    assert torch.isfinite(got).all()


def sharing(k, v, mask, lead, shared):
    """Make each row's first `shared` attended positions hold its lead row's keys and values
    (at the row's own columns: rows are padded differently), as rows whose prefix came from
    the same cached blocks hold them."""
    for b, (first, n) in enumerate(zip(lead, shared, strict=True)):
        if first != b:
            mine, theirs = mask[b].nonzero()[:n, 0], mask[first].nonzero()[:n, 0]
            k[b, :, mine], v[b, :, mine] = k[first, :, theirs], v[first, :, theirs]


@needs_kernel
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("teams", [
    ([0, 0, 0, 3, 3, 5, 0, 3, 8], [40, 40, 40, 13, 13, 0, 40, 13, 0]),  # teams of 4, 3, and rows alone
    ([0] * 11, [21] * 11),  # longer than kMaxRows: split, each part still shares
    ([0, 0, 2], [500, 500, 0]),  # more than a row attends to: as much as every member has
])
def test_rows_sharing_a_prefix_equal_rows_alone(isa, threads, teams):
    lead, shared = teams
    q, k, v, mask = inputs(len(lead), 9, 3, 64, 120, seed=len(lead))
    k, v = k.clone(), v.clone()
    sharing(k, v, mask, lead, [min(n, int(mask[b].sum())) for b, n in enumerate(shared)])
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        alone = torch.ops.loramux.decode_attention(q, k, v, mask, 0.125, isa == "avx512")
        together = torch.ops.loramux.decode_attention(q, k, v, mask, 0.125, isa == "avx512",
                                                      torch.tensor(lead, dtype=torch.int32),
                                                      torch.tensor(shared, dtype=torch.int32))
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(together, alone, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(together.double(), reference(q, k, v, mask, 0.125), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_kernel_reads_the_shared_prefix_from_the_lead_row():
    """A member's own copy of the prefix is not read: wrong data there changes nothing; wrong
    data after the prefix does (each row's own positions are still its own)."""
    q, k, v, mask = inputs(4, 9, 3, 64, 60)
    mask[:, :20] = True
    lead, shared = torch.tensor([0, 0, 0, 0], dtype=torch.int32), torch.tensor([20] * 4, dtype=torch.int32)
    k, v = k.clone(), v.clone()
    sharing(k, v, mask, lead.tolist(), [20] * 4)
    before = torch.ops.loramux.decode_attention(q, k, v, mask, 0.125, False, lead, shared)
    k[1:, :, :20] = 1e6
    assert torch.equal(torch.ops.loramux.decode_attention(q, k, v, mask, 0.125, False, lead, shared), before)
    k[2, :, 30] += 1
    after = torch.ops.loramux.decode_attention(q, k, v, mask, 0.125, False, lead, shared)
    assert torch.equal(after[[0, 1, 3]], before[[0, 1, 3]]) and not torch.equal(after[2], before[2])


@needs_kernel
def test_kernel_rejects_teams_it_cannot_form():
    q, k, v, mask = inputs(3, 6, 2, 64, 10)
    op = torch.ops.loramux.decode_attention
    for lead, shared in (([0, 2, 2], [4, 4, 4]), ([0, 0, 1], [4, 4, 4]), ([0, 0, 0], [4, 3, 4])):
        with pytest.raises(RuntimeError, match="lead"):
            op(q, k, v, mask, 0.125, False, torch.tensor(lead, dtype=torch.int32),
               torch.tensor(shared, dtype=torch.int32))


@needs_kernel
def test_kernel_rejects_what_it_cannot_read():
    q, k, v, mask = inputs(2, 6, 2, 64, 10)
    with pytest.raises(RuntimeError, match="mask"):
        torch.ops.loramux.decode_attention(q, k, v, mask.float(), 0.125, False)
    with pytest.raises(RuntimeError, match="multiple"):
        torch.ops.loramux.decode_attention(q[:, :5].contiguous(), k, v, mask, 0.125, False)
    with pytest.raises(RuntimeError, match="rows contiguous"):
        torch.ops.loramux.decode_attention(q, k.transpose(2, 3), v, mask, 0.125, False)


def call(q4, k, v, mask4, **kwargs):
    module = torch.nn.Module()
    module.num_key_value_groups = q4.shape[1] // k.shape[1]  # as transformers' attention modules say
    return attention.attention(module, q4, k, v, mask4, scaling=0.125, **kwargs)[0]


@pytest.fixture
def calls(monkeypatch) -> list:
    """The kernel calls that `attention.attention` makes (this CPU's build of the kernel)."""
    monkeypatch.setattr(attention, "_wide", kernels.isa() == "avx512")
    made = []
    op = torch.ops.loramux.decode_attention
    monkeypatch.setattr(attention.torch.ops.loramux, "decode_attention",
                        lambda *a: made.append(1) or op(*a), raising=False)
    return made


@needs_kernel
def test_interface_takes_decode_steps_to_the_kernel_and_the_rest_to_sdpa(calls):
    q, k, v, mask = inputs(4, 6, 2, 64, 12)
    q4, mask4 = q[:, :, None], mask[:, None, None, :]
    with torch.inference_mode():
        got = call(q4, k, v, mask4)
        assert calls and got.shape == (4, 1, 6, 64)
        torch.testing.assert_close(got[:, 0].double(), reference(q, k, v, mask, 0.125), rtol=1e-5, atol=1e-5)
        calls.clear()
        call(q4.double(), k.double(), v.double(), mask4)  # another dtype
        call(torch.cat([q4, q4], 2), k, v, None)  # two query positions: a prompt
        call(q4, k, v, mask4.float())  # an additive mask
        call(q4, k, v, mask4, sliding_window=4)
        with pytest.raises(ValueError, match="softcap"):  # SDPA's own answer, as without the kernel
            call(q4, k, v, mask4, softcap=30.0)
        call(q4, k, v, mask4, dropout=0.1)
    q4.requires_grad_(True)
    call(q4, k, v, mask4)  # gradients wanted
    assert not calls


@needs_kernel
@pytest.mark.parametrize("past, new", [(5, 7), (0, 13), (40, 1 + 2)])
def test_one_rows_prompt_takes_the_kernel_position_by_position(calls, past, new):
    """A prompt after its cached prefix (a mixed step's rider): one row, a boolean mask per
    query position; each position equals attention over the keys its mask row allows."""
    g = torch.Generator().manual_seed(past + new)
    k, v = (torch.randn(1, 2, past + new + 6, 64, generator=g)[:, :, 3:3 + past + new] for _ in range(2))
    q4 = torch.randn(1, 6, new + 8, 64, generator=g)[:, :, 4:4 + new]  # a slice, as a rider's is
    causal = mixed.causal(past, past + new, torch.device("cpu"))  # as a mixed step makes it
    with torch.inference_mode():
        got = call(q4, k, v, causal)
    assert calls and got.shape == (1, new, 6, 64)
    for t in range(new):
        want = reference(q4[:, :, t], k, v, causal[:, 0, t], 0.125)
        torch.testing.assert_close(got[:, t].double(), want, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_runner_decodes_with_the_kernel_as_with_sdpa(base_path):
    from loramux.model.loader import ModelSpec, load_base
    from loramux.model.runner import Runner, merge

    cpu = torch.device("cpu")
    model, tok = load_base(ModelSpec(str(base_path), "nf4", cpu, torch.float32))
    runner = Runner(model, tok, num_slots=2, max_rank=8, device=cpu, dtype=torch.float32)
    assert runner.attention_kernel and model.config._attn_implementation == attention.NAME
    prompts = [tok(t).input_ids for t in ("a short one", "a somewhat longer prompt than that", "x")]
    logits, group = runner.prefill(prompts, [-1] * 3)
    batch, tokens = merge(None, group), logits.argmax(-1).tolist()
    for _ in range(6):
        with_kernel = runner.decode(batch, tokens)
        batch.hi -= 1  # the same step again, through SDPA
        batch.next_pos = [p - 1 for p in batch.next_pos]
        model.set_attn_implementation("sdpa")
        with_sdpa = runner.decode(batch, tokens)
        model.set_attn_implementation(attention.NAME)
        torch.testing.assert_close(with_kernel, with_sdpa, rtol=1e-4, atol=1e-4)
        tokens = with_kernel.argmax(-1).tolist()
        assert tokens == with_sdpa.argmax(-1).tolist()


def test_runner_without_the_kernel_keeps_sdpa(base_path):
    from loramux.model.loader import ModelSpec, load_base
    from loramux.model.runner import Runner

    cpu = torch.device("cpu")
    model, tok = load_base(ModelSpec(str(base_path), "none", cpu, torch.float32))
    runner = Runner(model, tok, num_slots=2, max_rank=8, device=cpu, dtype=torch.float32, fused_attention=False)
    assert not runner.attention_kernel and model.config._attn_implementation != attention.NAME
