"""The running batch's in-place KV cache: rows joining and leaving never change a row's output.

Each row's greedy tokens and logits in a batch whose rows come and go (joins wider than
the live window, leavers in the middle, buffer re-layouts) must equal that row run alone.
"""

from __future__ import annotations

import pytest
import torch

from loramux.model import attention, kernels
from loramux.model import runner as runner_mod
from loramux.model.loader import ModelSpec, load_base
from loramux.model.prefix import BLOCK
from loramux.model.runner import Runner, merge

PROMPTS = {  # name: (prompt bytes, new tokens, step at which it joins)
    "a": (b"short one", 12, 0),
    "b": (b"a somewhat longer prompt than the first", 6, 2),
    "c": (b"mid", 9, 2),
    "d": (b"this prompt is much wider than anything running when it joins the batch", 5, 7),
    "e": (b"e", 8, 9),
}


@pytest.fixture(scope="module")
def runner(base_path) -> Runner:
    model, tok = load_base(ModelSpec(str(base_path), "none", torch.device("cpu"), torch.float32))
    return Runner(model, tok, num_slots=2, max_rank=8, device=torch.device("cpu"), dtype=torch.float32)


def ids(runner: Runner, text: bytes) -> list[int]:
    return runner.tokenizer(text.decode()).input_ids


def alone(runner: Runner, prompt: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    logits, group = runner.prefill([prompt], [-1])
    batch, tokens, seen = merge(None, group), [int(logits.argmax(-1))], [logits[0]]
    while len(tokens) < steps:
        logits = runner.decode(batch, tokens[-1:])
        tokens.append(int(logits.argmax(-1)))
        seen.append(logits[0])
    return tokens, seen


def join_and_leave(runner: Runner, batch, rows: list[str], plan: dict, step: int, got: dict) -> tuple:
    """Rows of `plan` ({name: (prompt, new tokens, joining step, ...)}) due at `step` are
    prefilled together and appended; rows with all their tokens leave."""
    joining = [name for name, entry in plan.items() if entry[2] == step]
    if joining:
        logits, group = runner.prefill([ids(runner, plan[n][0]) for n in joining], [-1] * len(joining))
        batch, rows = merge(batch, group), rows + joining
        record(got, joining, logits)
    done = {i for i, name in enumerate(rows) if len(got[name][0]) >= plan[name][1]}
    if len(done) == len(rows):
        return None, []
    return batch, [rows[i] for i in batch.remove(done)] if done else rows


def assert_as_alone(got: dict, want: dict) -> None:
    for name, (tokens, logits) in want.items():
        assert got[name][0] == tokens, name
        torch.testing.assert_close(torch.stack(got[name][1]), torch.stack(logits), atol=1e-4, rtol=1e-4)


def record(got: dict, rows: list[str], logits: torch.Tensor) -> None:
    for name, row_logits in zip(rows, logits, strict=False):
        got[name][0].append(int(row_logits.argmax(-1)))
        got[name][1].append(row_logits)


ROOMS = [(64, 64, 0.5), (0, 1, 0.0)]  # LEFT_ROOM, RIGHT_ROOM, RIGHT_SHARE


def set_room(monkeypatch, left: int, right: int, share: float) -> None:
    monkeypatch.setattr(runner_mod, "LEFT_ROOM", left)
    monkeypatch.setattr(runner_mod, "RIGHT_ROOM", right)
    monkeypatch.setattr(runner_mod, "RIGHT_SHARE", share)


@pytest.mark.parametrize("room", ROOMS, ids=["default-room", "relayout-every-step"])
def test_rows_joining_and_leaving_keep_each_row_its_own(runner, monkeypatch, room):
    set_room(monkeypatch, *room)
    want = {name: alone(runner, ids(runner, text), n) for name, (text, n, _) in PROMPTS.items()}
    batch, rows, got = None, [], {name: ([], []) for name in PROMPTS}
    for step in range(40):
        batch, rows = join_and_leave(runner, batch, rows, PROMPTS, step, got)
        if batch is not None:
            record(got, rows, runner.decode(batch, [got[name][0][-1] for name in rows]))
    assert_as_alone(got, want)


@pytest.mark.parametrize("room", ROOMS, ids=["default-room", "relayout-every-step"])
def test_no_unwritten_column_is_ever_exposed(runner, monkeypatch, room):
    """Buffers come unwritten (here: NaN, as memory may hold anything): every column the model
    sees is a written key or value, or zero padding (SDPA reads padding: 0 x NaN is NaN)."""
    set_room(monkeypatch, *room)
    empty = runner_mod.Batch._empty
    monkeypatch.setattr(runner_mod.Batch, "_empty", lambda self, r, c: tuple(t.fill_(float("nan"))
                                                                           for t in empty(self, r, c)))
    batch, rows, got = None, [], {name: ([], []) for name in PROMPTS}
    for step in range(40):
        batch, rows = join_and_leave(runner, batch, rows, PROMPTS, step, got)
        if batch is None:
            continue
        batch.step_mask()  # the step's own column is written by the step itself
        for layer in batch.cache.layers:
            assert torch.isfinite(layer.buf_k[: batch.n, :, batch.lo : batch.hi]).all(), step
            assert torch.isfinite(layer.buf_v[: batch.n, :, batch.lo : batch.hi]).all(), step
        record(got, rows, runner.decode(batch, [got[name][0][-1] for name in rows]))
    assert all(len(got[name][0]) == n for name, (_, n, _) in PROMPTS.items())


def test_removing_rows_moves_the_last_rows_into_the_gaps(runner, monkeypatch):
    set_room(monkeypatch, 64, 0, 0.0)  # the decode step re-lays the buffers out
    prompts = [ids(runner, t) for t in (b"r0", b"row one", b"r2", b"row three", b"r4")]
    _, group = runner.prefill(prompts, [-1, 0, -1, 1, -1])
    batch = merge(None, group)
    runner.decode(batch, [5] * 5)
    order = batch.remove({0, 2})
    assert order == [3, 1, 4]
    assert batch.size == 3 and batch.slots == [1, 0, -1]
    # the window shrank to the widest remaining row ("row three": BOS + 9 bytes, 1 decoded)
    assert batch.hi - batch.lo == len(prompts[3]) + 1


def test_selected_group_rows_decode_as_alone(runner):
    """Rows that ended at their first token are dropped from a prefilled group before it
    joins the batch; the others go on exactly as alone."""
    prompts = [ids(runner, t) for t in (b"kept one", b"ended at first token", b"kept two!")]
    logits, group = runner.prefill(prompts, [-1, -1, -1])
    batch = merge(None, group.select([0, 2]))
    tokens = [int(logits[0].argmax()), int(logits[2].argmax())]
    for _ in range(3):
        step = runner.decode(batch, tokens[-2:])
        tokens += [int(step[0].argmax()), int(step[1].argmax())]
    assert tokens[0::2] == alone(runner, prompts[0], 4)[0]
    assert tokens[1::2] == alone(runner, prompts[2], 4)[0]


def test_a_batch_made_for_its_capacity_takes_joining_rows_without_a_relayout(runner):
    """Groups joining a batch made with buffers for 4 rows are copied into them (the buffers
    stay the same tensors), every row still decodes as alone, and buffers short of rows grow
    to the rows the caller says are about to join."""
    prompts = [ids(runner, t) for t in (b"first", b"second row", b"third", b"the fourth row")]
    firsts, batch, buffers = [], None, []
    for part in ([0], [1, 2], [3]):
        logits, group = runner.prefill([prompts[i] for i in part], [-1] * len(part))
        firsts += [int(row.argmax()) for row in logits]
        batch = merge(batch, group, 4)
        buffers.append(batch.cache.layers[0].buf_k)
    assert batch.mask.shape[0] == 4 and buffers[0] is buffers[1] is buffers[2]
    tokens = [firsts]
    for _ in range(3):
        tokens.append([int(row.argmax()) for row in runner.decode(batch, tokens[-1])])
    for i, prompt in enumerate(prompts):
        assert [step[i] for step in tokens] == alone(runner, prompt, 4)[0]
    _, fifth = runner.prefill([ids(runner, b"one more")], [-1])
    assert merge(batch, fifth, 12).mask.shape[0] == 12  # short of rows: grown to the rows about to join


def test_a_wide_join_widens_the_buffers_without_growing_their_rows(runner, monkeypatch):
    monkeypatch.setattr(runner_mod, "LEFT_ROOM", 0)
    _, short = runner.prefill([ids(runner, b"hi")], [-1])
    batch = merge(None, short)
    rows = batch.mask.shape[0]
    _, wide = runner.prefill([ids(runner, b"a prompt far wider than the live window")], [-1])
    batch = merge(batch, wide)
    assert batch.size == 2 and batch.mask.shape[0] == rows
    assert batch.hi - batch.lo == len(ids(runner, b"a prompt far wider than the live window"))


def test_relayouts_within_the_buffers_slide_the_window_both_ways(runner, monkeypatch):
    """Buffers with the rows and room for the moved window stay the batch's own: the window
    slides left (decode steps reached the buffers' end after the widest row left) and right
    (a join wider than the free columns before it), over columns it overlaps, and every row
    decodes as alone."""
    set_room(monkeypatch, 2, 2, 1.0)
    plan = {  # the tiny model's tokenizer: a token a byte, after BOS
        "wide": (b"w" * 29, 3, 0),
        "long": (b"s" * 19, 40, 0),
        "late": (b"x" * 59, 3, 34),
    }
    slide, shifts = runner_mod.Batch._slide, []

    def recorded(self, left: int) -> None:
        shifts.append((self.lo - left, self.hi - self.lo))
        slide(self, left)

    monkeypatch.setattr(runner_mod.Batch, "_slide", recorded)
    want = {name: alone(runner, ids(runner, text), n) for name, (text, n, _) in plan.items()}
    batch, rows, got, buffers = None, [], {name: ([], []) for name in plan}, set()
    for step in range(50):
        batch, rows = join_and_leave(runner, batch, rows, plan, step, got)
        if batch is not None:
            record(got, rows, runner.decode(batch, [got[name][0][-1] for name in rows]))
            buffers.add(id(batch.cache.layers[0].buf_k))
    assert_as_alone(got, want)
    assert any(0 < shift < width for shift, width in shifts)  # left, overlapping
    assert any(-width < shift < 0 for shift, width in shifts)  # right, overlapping
    assert len(buffers) == 1  # made once, for the first join


def test_a_batch_left_empty_takes_the_next_rows_into_its_own_buffers(runner):
    """Every row leaves; rows that join later start a new window in the same buffers and
    decode as alone (however wide the old window was)."""
    first = [ids(runner, t) for t in (b"a first row that is rather long", b"second")]
    _, group = runner.prefill(first, [-1, -1])
    batch = merge(None, group, 4)
    for _ in range(3):
        runner.decode(batch, [5, 5])
    buffers = batch.cache.layers[0].buf_k
    assert batch.remove({0, 1}) == [] and batch.size == 0 and batch.hi == batch.lo
    later = ids(runner, b"later")
    logits, group = runner.prefill([later], [-1])
    merge(batch, group, 4)
    assert batch.cache.layers[0].buf_k is buffers and batch.hi - batch.lo == len(later)
    tokens = [int(logits.argmax(-1))]
    for _ in range(3):
        tokens.append(int(runner.decode(batch, tokens[-1:]).argmax(-1)))
    assert tokens == alone(runner, later, 4)[0]


@pytest.mark.parametrize("room", ROOMS, ids=["default-room", "relayout-every-step"])
def test_rows_taken_out_and_put_back_go_on_where_they_stopped(runner, monkeypatch, room):
    """Rows taken out for some steps (their adapter gave its slot up) and appended again
    later, while rows join and leave around them: every row's tokens and logits still
    equal the row run alone, and a row put back is no wider than its own tokens."""
    set_room(monkeypatch, *room)
    plan = {  # name: (prompt, new tokens, step it joins, steps it is out)
        "p": (b"out early", 10, 0, range(1, 4)),
        "q": (b"runs throughout", 14, 0, range(0)),
        "r": (b"out twice, then leaves", 9, 0, [*range(2, 5), *range(7, 9)]),
        "s": (b"joins while others are out", 6, 3, range(0)),
        "t": (b"t", 7, 5, range(6, 8)),
    }
    want = {name: alone(runner, ids(runner, text), n) for name, (text, n, _, _) in plan.items()}
    batch, rows, got, out = None, [], {name: ([], []) for name in plan}, {}
    for step in range(40):
        batch, rows = join_and_leave(runner, batch, rows, plan, step, got)
        for name in [n for n in out if step not in plan[n][3]]:  # back in
            batch = merge(batch, out.pop(name))
            rows.append(name)
            own = len(ids(runner, plan[name][0])) + len(got[name][0]) - 1  # its prompt and fed tokens
            assert batch.mask[len(rows) - 1, batch.lo : batch.hi].sum() == own
        leaving = {i for i, name in enumerate(rows) if step in plan[name][3]}
        if leaving:
            group, order = batch.take(leaving)
            for k, i in enumerate(sorted(leaving)):
                out[rows[i]] = group.select([k])
            batch, rows = (batch, [rows[i] for i in order]) if order else (None, [])
        if batch is not None:
            record(got, rows, runner.decode(batch, [got[name][0][-1] for name in rows]))
    assert_as_alone(got, want)


def test_taking_rows_out_packs_each_rows_columns_to_the_right(runner):
    prompts = [ids(runner, t) for t in (b"r0", b"a longer row one", b"r2")]
    _, group = runner.prefill(prompts, [-1, 0, 1])
    batch = merge(None, group)
    runner.decode(batch, [5, 5, 5])
    taken, order = batch.take({0, 2})
    assert order == [1] and batch.size == 1
    assert taken.slots == [-1, 1] and taken.next_pos == [len(prompts[0]) + 1, len(prompts[2]) + 1]
    assert taken.mask.tolist() == [[1] * (len(prompts[0]) + 1)] * 2  # as narrow as its rows
    assert taken.kv[0][0].shape[2] == len(prompts[0]) + 1


@pytest.mark.parametrize(("lengths", "cost", "groups"), [
    ([], 16, []),
    ([40], 16, [[0]]),
    ([128, 32], 16, [[1], [0]]),  # 96 padded tokens cost more than a second forward
    ([128, 120], 16, [[1, 0]]),  # 8 padded tokens cost less
    ([128, 32], 256, [[1, 0]]),  # where a forward costs more than the padding
    ([111, 47, 111, 45, 100], 16, [[3, 1], [4, 0, 2]]),
])
def test_prefill_split_minimises_padding_plus_forwards(lengths, cost, groups):
    got = runner_mod.split_by_length(lengths, cost)
    assert got == groups
    assert sorted(i for g in got for i in g) == list(range(len(lengths)))


def test_a_prompt_prefilled_in_pieces_goes_on_as_if_whole(runner):
    prompt = ids(runner, b"a long prompt that the engine prefills in pieces of five tokens")
    whole, steps = alone(runner, prompt, 4)
    logits, group = runner.prefill([prompt[:5]], [-1])
    for start in range(5, len(prompt), 5):
        logits, group = runner.prefill_more(group, prompt[start:start + 5])
    assert group.next_pos == [len(prompt)] and group.mask.shape == (1, len(prompt))
    torch.testing.assert_close(logits[0], steps[0], atol=1e-4, rtol=1e-4)  # other matmul shapes: rounding
    batch, tokens = merge(None, group), [int(logits.argmax(-1))]
    for _ in range(3):
        tokens.append(int(runner.decode(batch, tokens[-1:]).argmax(-1)))
    assert tokens == whole


def test_prompts_prefilled_inside_decode_steps_go_on_as_alone(runner):
    """Rows that join through `decode_mixed` (their prompts computed in a decode step's
    forward, one of them after a cached prefix) give the tokens and logits of the row run
    alone, and so do the rows decoding beside them."""
    assert runner.mixes
    plan = {name: (ids(runner, text), n, step) for name, (text, n, step) in PROMPTS.items()}
    want = {name: alone(runner, prompt, n) for name, (prompt, n, _) in plan.items()}
    logits, group = runner.prefill([plan["a"][0]], [-1])
    batch, rows, got = merge(None, group), ["a"], {name: ([], []) for name in plan}
    record(got, ["a"], logits)
    for step in range(1, 40):
        joining = [n for n, entry in plan.items() if entry[2] == step]  # none at most steps: a plain step
        pasts = []
        for name in joining:  # "d" takes its first 5 tokens from a "cache": its own earlier prefill
            own = runner.prefill([plan[name][0]], [-1])[1] if name == "d" else None
            pasts.append(None if own is None else runner.row_kv(own, 0, len(plan[name][0]))(0, 5))
        logits, first, groups = runner.decode_mixed(batch, [got[n][0][-1] for n in rows],
                                                    [plan[n][0] for n in joining], [-1] * len(joining), pasts)
        record(got, rows, logits)
        record(got, joining, first)
        for g in groups:
            batch = merge(batch, g)
        rows += joining
        done = {i for i, name in enumerate(rows) if len(got[name][0]) >= plan[name][1]}
        if len(done) == len(rows):
            break
        rows = [rows[i] for i in batch.remove(done)] if done else rows
    assert_as_alone(got, want)


@pytest.mark.skipif(not kernels.load(), reason="no C++ compiler or AVX2: no attention kernel")
def test_rows_from_the_same_cached_blocks_decode_as_a_team(runner, monkeypatch):
    """Rows whose prompts start with copies of the same cache blocks (one prefilled, one in a
    decode step) form a team: decode attention reads the shared keys and values from the
    first row's and gives what each row gets alone; rows of other blocks or none stay alone."""
    prefix = ids(runner, b"A shared instruction of some forty bytes: ")
    shared = len(prefix) // BLOCK * BLOCK
    past = runner.row_kv(runner.prefill([prefix], [-1])[1], 0, len(prefix))(0, shared)
    plan = {"x": (prefix + ids(runner, b"first?"), 6), "z": (ids(runner, b"unrelated"), 6),
            "y": (prefix + ids(runner, b"and the second"), 5)}
    want = {name: alone(runner, prompt, n) for name, (prompt, n) in plan.items()}
    origin = (7, 8)  # block ids: any, as long as both rows name the same

    def run(teams: bool) -> dict:
        monkeypatch.setattr(runner_mod.Batch, "teams", runner_mod.Batch.teams if teams else lambda self: None)
        logits, group = runner.prefill([plan["x"][0], plan["z"][0]], [-1, -1], [past, None], [origin, ()])
        batch, rows, got = merge(None, group), ["x", "z"], {name: ([], []) for name in plan}
        record(got, rows, logits)
        logits, first, groups = runner.decode_mixed(batch, [got[n][0][-1] for n in rows], [plan["y"][0]], [-1],
                                                    [past], [origin])
        record(got, rows, logits)
        record(got, ["y"], first)
        batch, rows = merge(batch, groups[0]), rows + ["y"]
        if teams:
            assert [t.tolist() for t in batch.teams()] == [[0, 1, 0], [shared, 0, shared]]
        while len(got["x"][0]) < 6:
            record(got, rows, runner.decode(batch, [got[n][0][-1] for n in rows]))
        return got

    made = []
    op = torch.ops.loramux.decode_attention
    monkeypatch.setattr(attention.torch.ops.loramux, "decode_attention",
                        lambda *a: made.append(len(a) > 6 and a[6] is not None) or op(*a), raising=False)
    together = run(True)
    assert any(made)
    assert_as_alone(together, want)
    apart = run(False)
    for name in plan:
        assert together[name][0] == apart[name][0]
        for a, b in zip(together[name][1], apart[name][1], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
