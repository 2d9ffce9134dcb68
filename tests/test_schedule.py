"""`oryx.schedule`: parsing, each kind against a per-position loop, piecewise ≡ whole, chunk draws, errors."""

import math

import pytest
import torch

import oryx
from oryx import ATTN, LINEAR
from oryx import schedule as schedule_module
from oryx.schedule import GRAMMAR, Chunks, Fixed, Schedule, Spans, Tail, attention_fraction, parse


def loop_modes(rule, batch: int, length: int, offset: int = 0) -> torch.Tensor:
    """[B, T] from a per-position rule `rule(pos) -> mode`, written as a plain loop."""
    out = torch.empty(batch, length, dtype=torch.long)
    for b in range(batch):
        for t in range(length):
            out[b, t] = rule(offset + t)
    return out


def pieces(total: int, gen: torch.Generator) -> list[tuple[int, int]]:
    """Random cut of [0, total) into (offset, length) pieces of 1 … 7 tokens."""
    out, start = [], 0
    while start < total:
        n = min(int(torch.randint(1, 8, (1,), generator=gen)), total - start)
        out.append((start, n))
        start += n
    return out


def test_mode_constants_match_the_package():
    assert (schedule_module.ATTN, schedule_module.LINEAR) == (oryx.ATTN, oryx.LINEAR) == (0, 1)
    assert oryx.schedule.parse is parse


# --- each kind against an independent loop


@pytest.mark.parametrize("spec, mode", [("attn", ATTN), ("linear", LINEAR)])
def test_fixed(spec, mode):
    m = parse(spec).modes(3, 11, offset=5)
    assert m.dtype == torch.long and m.shape == (3, 11)
    assert torch.equal(m, loop_modes(lambda pos: mode, 3, 11))


@pytest.mark.parametrize("offset", [0, 3, 1535, 1536, 2000])
def test_spans(offset):
    s = parse("spans:linear@0,attn@1536,linear@1540,attn@1541")

    def rule(pos):
        if pos < 1536:
            return LINEAR
        if pos < 1540:
            return ATTN
        return LINEAR if pos < 1541 else ATTN

    assert torch.equal(s.modes(2, 40, offset=offset), loop_modes(rule, 2, 40, offset))


@pytest.mark.parametrize("n, prompt", [(0, 10), (3, 10), (10, 10), (15, 10), (4, 0)])
def test_tail(n, prompt):
    s = parse(f"tail:attn={n}")
    expected = loop_modes(lambda pos: ATTN if pos >= prompt - n else LINEAR, 2, 20)
    assert torch.equal(s.modes(2, 20, prompt_length=prompt), expected)


def test_tail_generation_steps_are_attention():
    s = parse("tail:attn=4")
    for pos in range(10, 15):  # one generated token at a time, as generate() calls it
        assert torch.equal(s.modes(3, 1, offset=pos, prompt_length=10), torch.full((3, 1), ATTN))


def test_tail_needs_prompt_length():
    with pytest.raises(ValueError, match=r"tail:attn=4.*prompt_length"):
        parse("tail:attn=4").modes(1, 8)


def test_chunks_against_loop(gen):
    size, batch, length, offset = 5, 4, 23, 7
    s = parse(f"chunks:size={size},p_attn=0.5")
    state = gen.get_state()
    m = s.modes(batch, length, offset=offset, generator=gen)
    # The same draws, independently: one uniform per (row, covered chunk), attention when below p_attn.
    first = offset // size
    u = torch.rand(batch, (offset + length - 1) // size - first + 1, generator=gen.set_state(state))
    expected = torch.empty(batch, length, dtype=torch.long)
    for b in range(batch):
        for t in range(length):
            expected[b, t] = ATTN if u[b, (offset + t) // size - first] < 0.5 else LINEAR
    assert torch.equal(m, expected)


# --- piecewise ≡ whole for deterministic kinds


@pytest.mark.parametrize("spec", ["attn", "linear", "spans:attn@0,linear@3,attn@4,linear@17", "tail:attn=6"])
def test_piecewise_equals_whole(spec, gen):
    s, total, prompt = parse(spec), 40, 25
    assert s.deterministic
    whole = s.modes(2, total, prompt_length=prompt)
    parts = [s.modes(2, n, offset=o, prompt_length=prompt) for o, n in pieces(total, gen)]
    assert torch.equal(torch.cat(parts, dim=1), whole)


# --- chunk draws


def test_chunk_tokens_share_a_mode_and_rows_differ(gen):
    size, batch, length = 16, 32, 160
    m = parse(f"chunks:size={size}").modes(batch, length, generator=gen)
    per_chunk = m.view(batch, length // size, size)
    assert (per_chunk == per_chunk[..., :1]).all(), "a chunk mixes modes"
    # 32 rows × 10 chunks: P(all rows identical) is astronomically small.
    assert len({tuple(row.tolist()) for row in m}) > 1, "every batch row got the same draw"


def test_chunks_cut_at_absolute_positions(gen):
    m = parse("chunks:size=8,p_attn=0.5").modes(64, 13, offset=5, generator=gen)
    assert (m[:, :3] == m[:, :1]).all()  # positions 5, 6, 7: chunk 0
    assert (m[:, 3:11] == m[:, 3:4]).all()  # positions 8 … 15: chunk 1
    assert (m[:, 11:] == m[:, 11:12]).all()  # positions 16, 17: chunk 2
    assert (m[:, 0] != m[:, 3]).any()


def test_chunks_empirical_p_attn(gen):
    m = parse("chunks:size=4,p_attn=0.25").modes(256, 4 * 64, generator=gen)  # 16384 chunk draws
    p = attention_fraction(m)
    assert abs(p - 0.25) < 0.03, p  # std of the estimate ≈ 0.0034: ~9 sigma


@pytest.mark.parametrize("p, mode", [(0.0, LINEAR), (1.0, ATTN)])
def test_chunks_extreme_p(p, mode, gen):
    m = Chunks(size=3, p_attn=p).modes(8, 30, generator=gen)
    assert (m == mode).all()


def test_chunks_same_seed_same_draws():
    s = parse("chunks:size=4")
    a = s.modes(8, 64, generator=torch.Generator().manual_seed(123))
    b = s.modes(8, 64, generator=torch.Generator().manual_seed(123))
    c = s.modes(8, 64, generator=torch.Generator().manual_seed(124))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not s.deterministic


def test_empty_and_bad_calls():
    assert parse("chunks").modes(2, 0).shape == (2, 0)
    assert parse("spans:attn@0").modes(0, 5).shape == (0, 5)
    with pytest.raises(ValueError, match="offset"):
        parse("attn").modes(1, 4, offset=-1)
    with pytest.raises(ValueError, match="prompt_length"):
        parse("tail:attn=1").modes(1, 4, prompt_length=-2)


# --- attention_fraction


def test_attention_fraction():
    modes = torch.tensor([[ATTN, ATTN, LINEAR, LINEAR], [ATTN, LINEAR, LINEAR, LINEAR]])
    assert attention_fraction(modes) == 3 / 8
    mask = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])  # left padding is not counted
    assert attention_fraction(modes, mask) == 1 / 5
    assert math.isnan(attention_fraction(modes, torch.zeros_like(mask)))
    assert parse("spans:linear@0,attn@6").attention_fraction(8) == 2 / 8
    assert parse("tail:attn=2").attention_fraction(10, prompt_length=10) == 2 / 10
    assert parse("chunks:p_attn=0.3").attention_fraction(100) == 0.3


# --- spec strings


@pytest.mark.parametrize(
    "spec, canonical, expected",
    [
        ("attn", "attn", Fixed(ATTN)),
        ("  linear ", "linear", Fixed(LINEAR)),
        ("chunks", "chunks:size=128,p_attn=0.25", Chunks(128, 0.25)),
        ("chunks: p_attn = 0.5 ", "chunks:size=128,p_attn=0.5", Chunks(128, 0.5)),
        ("chunks:size=64", "chunks:size=64,p_attn=0.25", Chunks(64, 0.25)),
        ("chunks:p_attn=1,size=7", "chunks:size=7,p_attn=1.0", Chunks(7, 1.0)),
        ("spans: linear@0 , attn @ 1536", "spans:linear@0,attn@1536", Spans(((0, LINEAR), (1536, ATTN)))),
        ("tail : attn=64", "tail:attn=64", Tail(64)),
    ],
)
def test_str_round_trip(spec, canonical, expected):
    s = parse(spec)
    assert s == expected
    assert str(s) == canonical
    assert parse(str(s)) == s


def test_schedule_passes_through():
    s = parse("tail:attn=3")
    assert parse(s) is s
    assert isinstance(s, Schedule)
    with pytest.raises(TypeError):
        parse(3)


@pytest.mark.parametrize(
    "spec, fragments",
    [
        ("", ["empty"]),
        ("   ", ["empty"]),
        ("chunk:size=128", ["unknown schedule kind 'chunk'", "did you mean 'chunks'"]),
        ("attention", ["unknown schedule kind 'attention'", "did you mean 'attn'"]),
        ("attn:size=3", ["takes no parameters"]),
        ("chunks:sise=128", ["unknown chunks key 'sise'", "did you mean 'size'"]),
        ("chunks:size=128,size=64", ["duplicate", "'size'"]),
        ("chunks:size", ["bad chunks parameter 'size'", "KEY=VALUE"]),
        ("chunks:size=12.5", ["chunk size must be an integer", "'12.5'"]),
        ("chunks:size=big", ["chunk size must be an integer", "'big'"]),
        ("chunks:size=0", ["chunk size must be > 0"]),
        ("chunks:size=-4", ["chunk size must be > 0"]),
        ("chunks:p_attn=1.5", ["p_attn must be in [0, 1]", "1.5"]),
        ("chunks:p_attn=-0.1", ["p_attn must be in [0, 1]"]),
        ("chunks:p_attn=nan", ["p_attn must be in [0, 1]"]),
        ("chunks:p_attn=half", ["p_attn must be a number", "'half'"]),
        ("spans:", ["at least one MODE@POS"]),
        ("spans:linear@0,atn@10", ["unknown span mode 'atn'", "did you mean 'attn'"]),
        ("spans:linear@0,rnn@10", ["unknown span mode 'rnn'", "attn, linear"]),
        ("spans:linear0", ["bad span 'linear0'", "MODE@POS"]),
        ("spans:linear@0,attn@x", ["span position must be an integer", "'x'"]),
        ("spans:linear@0,attn@20,linear@20", ["strictly increasing", "20 after 20"]),
        ("spans:linear@0,attn@20,linear@10", ["strictly increasing", "10 after 20"]),
        ("spans:linear@-5", ["span position must be >= 0", "-5"]),
        ("spans:attn@1536", ["first span must start at position 0", "1536"]),
        ("tail", ["tail needs attn=N"]),
        ("tail:attn=-1", ["tail attn must be >= 0", "-1"]),
        ("tail:attn=2.5", ["tail attn must be an integer"]),
        ("tail:n=4", ["unknown tail key 'n'"]),
    ],
)
def test_bad_specs(spec, fragments):
    with pytest.raises(ValueError) as info:
        parse(spec)
    message = str(info.value)
    for fragment in [*fragments, repr(spec), GRAMMAR]:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_direct_construction_is_checked():
    with pytest.raises(ValueError, match="strictly increasing"):
        Spans(((0, ATTN), (0, LINEAR)))
    with pytest.raises(ValueError, match="p_attn"):
        Chunks(p_attn=2.0)
    with pytest.raises(ValueError, match="mode"):
        Fixed(2)
