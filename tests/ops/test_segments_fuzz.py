"""Property tests (hypothesis) of the segment metadata, of the op on arbitrary segmentations, and of malformed
segment offsets, rejected with a message naming them."""
import itertools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import available_backends, kernel_device
from monkey_kernels import SegmentInfo, multi_lora_linear, multi_lora_linear_ref
from monkey_kernels._triton.env import interpreter_active

NUM_ADAPTERS = 3

segmentations = st.lists(
    st.tuples(st.integers(0, 9), st.integers(-1, NUM_ADAPTERS - 1)), min_size=0, max_size=12
)


@settings(max_examples=60, deadline=None)
@given(segmentations)
def test_metadata_maps_every_row_to_its_segment_and_adapter(segments):
    lengths = [n for n, _ in segments]
    ids = [a for _, a in segments]
    indptr = [0] + list(itertools.accumulate(lengths))
    info = SegmentInfo.from_indptr(indptr, ids)
    expected_segment = [g for g, n in enumerate(lengths) for _ in range(n)]
    assert info.num_rows == sum(lengths) and info.num_segments == len(segments)
    assert info.row_segment.tolist() == expected_segment
    assert info.row_adapter.tolist() == [ids[g] for g in expected_segment]
    assert info.segment_length == (lengths[0] if len(set(lengths)) == 1 else None)
    unvalidated = SegmentInfo.from_indptr(indptr, ids, num_rows=sum(lengths), validate=False)
    assert torch.equal(unvalidated.row_segment, info.row_segment)


def _check_op(segments, backend, seed):
    generator = torch.Generator().manual_seed(seed)
    lengths = [n for n, _ in segments]
    ids = [a for _, a in segments]
    device = kernel_device(backend)
    info = SegmentInfo.from_indptr([0] + list(itertools.accumulate(lengths)), ids, device=device)
    rows, k, n, r = info.num_rows, 19, 13, 4

    def rand(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    x, w, b = rand(rows, k), rand(n, k), rand(n)
    a, bb, s = rand(NUM_ADAPTERS, r, k), rand(NUM_ADAPTERS, n, r), rand(NUM_ADAPTERS)
    ranks = [1 + (i % r) for i in range(NUM_ADAPTERS)]
    expected = multi_lora_linear_ref(x, w, b, a, bb, s, info.to("cpu"), ranks=ranks)
    args = [t.float().to(device) for t in (x, w, b, a, bb, s)]
    out = multi_lora_linear(*args, info, ranks=ranks, backend=backend)
    torch.testing.assert_close(out.double().cpu(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", available_backends())
def test_backend_matches_the_loop_on_any_segmentation(backend):
    if backend == "triton" and not (torch.cuda.is_available() or interpreter_active()):
        pytest.skip("needs the Triton kernels")
    # The interpreter runs a kernel launch in ~0.1 s: fewer examples there keep the suite fast.
    examples = 6 if backend == "triton" and not torch.cuda.is_available() else 40

    @settings(max_examples=examples, deadline=None)
    @given(segmentations, st.integers(0, 2**31 - 1))
    def check(segments, seed):
        _check_op(segments, backend, seed)

    check()


MUTATIONS = ["not_at_zero", "decreasing", "negative", "last_not_num_rows", "float_tensor", "bool_tensor",
             "length_mismatch", "float_list"]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lengths=st.lists(st.integers(0, 6), min_size=1, max_size=8), mutation=st.sampled_from(MUTATIONS),
       where=st.integers(0, 100), amount=st.integers(1, 5))
def test_fuzzed_malformed_indptr_is_rejected_naming_it(lengths, mutation, where, amount):
    indptr = [0] + list(itertools.accumulate(lengths))
    ids = [i % 3 - 1 for i in range(len(lengths))]
    num_rows = None
    if mutation == "not_at_zero":
        indptr = [v + amount for v in indptr]
        pattern = "seg_indptr must start at 0"
    elif mutation == "decreasing":
        i = 1 + where % len(lengths)  # an inner or the last entry drops below its predecessor
        indptr[i] = indptr[i - 1] - amount
        pattern = "seg_indptr must be (non-decreasing|non-negative)"
    elif mutation == "negative":
        i = 1 + where % len(lengths)
        indptr[i] = -amount
        pattern = "seg_indptr must be non-negative"
    elif mutation == "last_not_num_rows":
        num_rows = indptr[-1] + amount
        pattern = rf"seg_indptr\[-1\]={indptr[-1]} does not match num_rows={num_rows}"
    elif mutation == "float_tensor":
        indptr = torch.tensor(indptr, dtype=torch.float32)
        pattern = "seg_indptr must be an integer tensor"
    elif mutation == "bool_tensor":
        indptr = torch.tensor(indptr) > 0
        pattern = "seg_indptr must be an integer tensor"
    elif mutation == "length_mismatch":
        ids = ids + [0] * amount if where % 2 else ids[:-1]
        pattern = r"seg_indptr must have len\(adapter_ids\) \+ 1"
    else:
        indptr = [float(v) + 0.5 for v in indptr]
        pattern = "seg_indptr must be a 1-D sequence of ints"
    with pytest.raises(ValueError, match=pattern):
        SegmentInfo.from_indptr(indptr, ids, num_rows=num_rows)
