"""The shared schedule model: strict parsing, step/block resolution, composition, JSON round-trip."""
import pytest

from comfy_sage.kernels.schedule import ALL, Schedule, ScheduleError, step_index


def eight_bit_steps(s: Schedule, n: int, block=None, kind="self"):
    return [i for i in range(n) if s.variant(i, n, block, kind) is not None]


@pytest.mark.parametrize("field", ["steps", "exact_steps", "blocks", "exact_blocks"])
@pytest.mark.parametrize("bad", ["3-", "a-b", "5-2", "1-2-3", "x", "0-1,,2", "0-1,", "--1", "3 4"])
def test_malformed_tokens_name_the_token(field, bad):
    with pytest.raises(ScheduleError) as e:
        Schedule.from_strings(**{field: bad})
    msg = str(e.value)
    assert field in msg
    # the offending token (or the whole text for a stray comma) is quoted in the message
    assert e.value.token is not None and repr(e.value.token) in msg
    assert e.value.token.strip() in bad
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize("bad,why", [("1.5-2", "outside"), ("0.5", "range like"), ("0.6-0.2", "not before"),
                                     ("0.2-0.2", "not before")])
def test_fraction_errors(bad, why):
    with pytest.raises(ScheduleError, match=why) as e:
        Schedule.from_strings(steps=bad)
    assert e.value.token == bad


def test_bad_token_is_named_among_good_ones():
    with pytest.raises(ScheduleError) as e:
        Schedule.from_strings(blocks="0-3, 7-5, 38-39")
    assert e.value.token == "7-5" and "'7-5'" in str(e.value)


@pytest.mark.parametrize("kw", [dict(attention="both"), dict(pv="int4"), dict(blocks="foo:1"),
                                dict(blocks="-1"), dict(blocks="double:-1"), dict(overrides={"12": "fp8"}),
                                dict(overrides={"12:self": "int4"}), dict(overrides={"12:self": "sparse:keep=1.5"}),
                                dict(sparse="keep=0"), dict(sparse="half")])
def test_other_bad_values(kw):
    with pytest.raises(ScheduleError):
        Schedule.from_strings(**kw)


def test_empty_means_all():
    s = Schedule.from_strings("", "", "all", "auto")
    assert s == ALL and s.is_all
    assert eight_bit_steps(s, 7) == list(range(7))
    assert s.variant(3, 7, None, "cross") == "auto"
    assert s.variant(None, None, None, "self") == "auto"


def test_step_indices_and_negatives():
    s = Schedule.from_strings(exact_steps="0-1, -1")  # exact on the first 2 and the last step
    assert eight_bit_steps(s, 10) == list(range(2, 9))
    assert eight_bit_steps(s, 4) == [2]
    s = Schedule.from_strings(steps="-3--1")
    assert eight_bit_steps(s, 10) == [7, 8, 9]
    s = Schedule.from_strings(steps="2, 5-6")
    assert eight_bit_steps(s, 10) == [2, 5, 6]


def test_step_fractions():
    s = Schedule.from_strings(steps="0.9-1.0")
    assert eight_bit_steps(s, 20) == [18, 19]
    assert eight_bit_steps(s, 10) == [9]
    s = Schedule.from_strings(steps="0-0.1")  # a "." in either bound makes a fraction range
    assert eight_bit_steps(s, 20) == [0, 1]
    s = Schedule.from_strings(steps=".25-.5, 0.75-1")
    assert eight_bit_steps(s, 8) == [2, 3, 6, 7]


def test_unknown_step_keeps_restricted_schedule_exact():
    s = Schedule.from_strings(steps="0-3")
    assert s.variant(None, None, 0, "self") is None
    assert ALL.variant(None, None, 0, "self") is not None


def test_blocks_flat_and_groups():
    s = Schedule.from_strings(blocks="0-3, 38-39")
    assert [b for b in range(45) if s.variant(0, 1, b) is not None] == [0, 1, 2, 3, 38, 39]
    assert s.variant(0, 1, None) is None  # a block rule with an unknown block stays exact
    g = Schedule.from_strings(blocks="double:2-3, single")
    assert g.variant(0, 1, 2, group="double", group_index=2) == "auto"
    assert g.variant(0, 1, 4, group="double", group_index=4) is None
    assert g.variant(0, 1, 40, group="single", group_index=21) == "auto"
    u = Schedule.from_strings(exact_blocks="middle, output:3-5")
    assert u.variant(0, 1, 7, group="middle", group_index=0) is None
    assert u.variant(0, 1, 8, group="output", group_index=4) is None
    assert u.variant(0, 1, 2, group="input", group_index=4) == "auto"


def test_attention_kind_and_pv():
    s = Schedule.from_strings(attention="self", pv="fp16")
    assert s.variant(0, 1, 0, "self") == "fp16"
    assert s.variant(0, 1, 0, "cross") is None
    c = Schedule.from_strings(attention="CROSS", pv="fp8")
    assert c.variant(0, 1, 0, "cross") == "fp8" and c.variant(0, 1, 0, "self") is None
    with pytest.raises(ScheduleError, match="kind"):
        s.variant(0, 1, 0, "joint")


def test_overrides_site_level():
    s = Schedule.from_strings(blocks="0-1", exact_steps="0", overrides={"1:self": "exact", "5:cross": "fp16"})
    assert s.variant(1, 4, 0, "self") == "auto"
    assert s.variant(1, 4, 1, "self") is None          # calibrated exact
    assert s.variant(1, 4, 5, "cross") == "fp16"       # override beats the block rule
    assert s.variant(0, 4, 5, "cross") is None         # the step rule still applies


def test_fine_override_ranks_between_fp16_and_exact():
    fine = Schedule(overrides={"1:self": "fine", "2:self": "fine", "3:self": "fp8"})
    other = Schedule(overrides={"1:self": "fp16", "2:self": "exact", "3:self": "fine"}, pv="fp8")
    assert (fine & other).overrides == {"1:self": "fine", "2:self": "exact", "3:self": "fine"}
    assert (Schedule(pv="fine") & Schedule(pv="fp16")).pv == "fine"
    assert fine.variant(0, 4, 1, "self") == "fine"
    assert Schedule.from_json(fine.to_json()) == fine


def test_composition_steps_times_blocks():
    steps = Schedule.from_strings(exact_steps="0, -1")
    blocks = Schedule.from_strings(blocks="2-3", pv="fp8")
    both = steps & blocks
    assert both == steps.compose(blocks)
    got = {(i, b) for i in range(5) for b in range(6) if both.variant(i, 5, b) is not None}
    assert got == {(i, b) for i in (1, 2, 3) for b in (2, 3)}
    assert both.pv == "fp8"
    assert (both & Schedule.from_strings(pv="fp16")).pv == "fp16"  # the more precise wins
    assert (Schedule.from_strings(attention="self") & Schedule.from_strings(attention="cross")).attention == "none"
    nothing = Schedule.from_strings(attention="self") & Schedule.from_strings(attention="cross")
    assert nothing.variant(0, 1, 0, "self") is None and nothing.variant(0, 1, 0, "cross") is None
    assert steps.compose(None) is steps
    with pytest.raises(TypeError):
        steps.compose("0-1")


def test_composed_step_clauses_intersect():
    s = Schedule.from_strings(steps="0-5") & Schedule.from_strings(steps="4-9")
    assert eight_bit_steps(s, 10) == [4, 5]


def test_json_round_trip_and_hash():
    s = Schedule.from_strings(steps="0.1-1.0", blocks="double:0-3, 20", attention="self", pv="fp16",
                              exact_steps="-1", exact_blocks="7", overrides={"3:cross": "exact"})
    s2 = Schedule.from_json(s.to_json())
    assert s2 == s and hash(s2) == hash(s)
    assert eight_bit_steps(s2, 10, block=1) == eight_bit_steps(s, 10, block=1)
    composed = s & Schedule.from_strings(steps="0-4")
    assert Schedule.from_json(composed.to_json()) == composed
    with pytest.raises(ScheduleError):
        Schedule.from_json("{not json")
    with pytest.raises(ScheduleError, match="unknown schedule field 'stepz'"):
        Schedule.from_json('{"stepz": []}')
    with pytest.raises(ScheduleError) as e:
        Schedule.from_json('{"steps": ["0-1", "9-3"]}')
    assert e.value.token == "9-3"


def test_frozen():
    with pytest.raises(Exception):
        ALL.pv = "fp8"


def test_check_out_of_range():
    Schedule.from_strings(steps="0-4, -5").check(num_steps=5)
    for text in ("7", "3-5", "-6"):
        with pytest.raises(ScheduleError) as e:
            Schedule.from_strings(steps=text).check(num_steps=5)
        assert e.value.token == text and "out of range" in str(e.value)
    with pytest.raises(ScheduleError, match="'38-39'.*out of range"):
        Schedule.from_strings(blocks="0-3, 38-39").check(num_blocks=30)
    Schedule.from_strings(blocks="0-3, 38-39").check(num_blocks=40)
    with pytest.raises(ScheduleError, match="no 'single' blocks"):
        Schedule.from_strings(blocks="single:0").check(groups={"double": 4})
    with pytest.raises(ScheduleError, match="double block 4"):
        Schedule.from_strings(exact_blocks="double:4").check(groups={"double": 4})


def test_step_index_from_sigmas():
    sig = [14.6, 7.0, 3.0, 1.0, 0.3, 0.0]
    assert [step_index(s, sig) for s in sig[:-1]] == [(i, 5) for i in range(5)]
    assert step_index(5.0, sig) == (1, 5)   # an intermediate (Heun/DPM2) evaluation belongs to its interval
    assert step_index(0.1, sig) == (4, 5)
    assert step_index(20.0, sig) == (0, 5)
    assert step_index(1.0, None) == (None, None)
    assert step_index(1.0, [1.0]) == (None, None)


def test_step_overrides_apply_on_their_steps_and_round_trip():
    s = Schedule(overrides={"3:self": "sparse:keep=0.3", "4:self": "fp8"},
                 step_overrides={" 0.5-1.0 ": {"3:self": "fp16"}})
    assert s.variant(0, 10, 3) == "sparse:keep=0.3" and s.variant(5, 10, 3) == "fp16"
    assert s.variant(9, 10, 4) == "fp8" and s.variant(None, None, 3) == "sparse:keep=0.3"
    assert Schedule.from_json(s.to_json()) == s and not s.is_all and "steps 0.5-1.0" in s.describe()
    both = s & Schedule(step_overrides={"0.5-1.0": {"3:self": "exact"}})
    assert both.variant(6, 10, 3) is None and both.variant(1, 10, 3) == "sparse:keep=0.3"
    for bad, match in (({"0.5-2.0": {"3:self": "fp8"}}, "1.5|2.0|fraction"), ({"0.5-1.0": {"x": "fp8"}}, "bad site"),
                       ({"0.5-1.0": {"3:self": "fp9"}}, "bad value"), ({"0.5-1.0": "fp8"}, "expected a dict")):
        with pytest.raises(ScheduleError, match=match):
            Schedule(step_overrides=bad)
    with pytest.raises(ScheduleError, match="out of range"):
        Schedule(step_overrides={"0.5-1.0": {"40:self": "fp8"}}).check(num_blocks=30)
