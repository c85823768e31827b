"""``SegmentInfo``: row maps of ragged and empty segments, and bad metadata (types, devices, ranges)."""
import pytest
import torch

from monkey_kernels import SegmentInfo


def test_from_batch_maps_rows_to_segments_and_adapters():
    info = SegmentInfo.from_batch([2, -1, 0], seq_len=4)
    assert info.num_rows == 12 and info.num_segments == 3 and info.max_adapter_id == 2
    assert info.seg_indptr.tolist() == [0, 4, 8, 12]
    assert info.row_segment.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert info.row_adapter.tolist() == [2] * 4 + [-1] * 4 + [0] * 4
    assert info.seg_indptr.dtype == info.adapter_ids.dtype == info.row_segment.dtype == torch.int32


def test_from_indptr_handles_empty_and_ragged_segments():
    info = SegmentInfo.from_indptr(torch.tensor([0, 0, 3, 3, 4, 4]), torch.tensor([1, 0, 2, -1, 1]))
    assert info.num_rows == 4 and info.num_segments == 5
    assert info.row_segment.tolist() == [1, 1, 1, 3]
    assert info.row_adapter.tolist() == [0, 0, 0, -1]


def test_from_indptr_without_validation_reads_nothing_back():
    info = SegmentInfo.from_indptr([0, 2, 5], [0, 1], num_rows=5, validate=False)
    assert info.max_adapter_id is None
    assert info.row_segment.tolist() == [0, 0, 1, 1, 1]


@pytest.mark.parametrize(
    "indptr, ids, message",
    [
        ([1, 3], [0], "start at 0"),
        ([0, 3, 2], [0, 1], "non-decreasing"),
        ([0, -1, 2], [0, 1], "non-negative"),
        ([0, 2], [0, 1], "len\\(adapter_ids\\) \\+ 1"),
        ([0, 2, 4], [0, -2], "adapter_ids\\[1\\]=-2"),
    ],
)
def test_from_indptr_rejects_bad_metadata(indptr, ids, message):
    with pytest.raises(ValueError, match=message):
        SegmentInfo.from_indptr(indptr, ids)


def test_num_rows_must_match_indptr():
    with pytest.raises(ValueError, match="num_rows=5"):
        SegmentInfo.from_indptr([0, 2, 4], [0, 1], num_rows=5)


@pytest.mark.parametrize("bad", [torch.tensor([0.0, 1.0]), torch.tensor([[0, 1]])])
def test_adapter_ids_must_be_1d_integers(bad):
    with pytest.raises(ValueError, match="adapter_ids"):
        SegmentInfo.from_batch(bad, seq_len=3)


def test_seq_len_must_be_non_negative_int():
    with pytest.raises(ValueError, match="seq_len"):
        SegmentInfo.from_batch([0], seq_len=-1)


SEGMENT_ERRORS = {
    "batch_ids_none": (lambda: SegmentInfo.from_batch(None, 3), "adapter_ids must be a 1-D sequence"),
    "batch_ids_str": (lambda: SegmentInfo.from_batch("01", 3), "adapter_ids must be a 1-D sequence"),
    "batch_ids_nested": (lambda: SegmentInfo.from_batch([[0, 1]], 3), "adapter_ids must be 1-D"),
    "batch_ids_ragged": (lambda: SegmentInfo.from_batch([[0], [1, 2]], 3), "adapter_ids must be a 1-D"),
    "batch_ids_float": (lambda: SegmentInfo.from_batch([0.5], 3), "adapter_ids must be a 1-D sequence of ints"),
    "batch_ids_overflow": (lambda: SegmentInfo.from_batch([10**30], 3), "adapter_ids must be a 1-D sequence"),
    "batch_ids_wrap": (lambda: SegmentInfo.from_batch([2**31], 3), "adapter_ids must fit in int32"),
    "batch_ids_bool_tensor": (lambda: SegmentInfo.from_batch(torch.tensor([True]), 3), "adapter_ids must be an int"),
    "batch_ids_meta": (lambda: SegmentInfo.from_batch(torch.tensor([0], device="meta"), 3),
                       "adapter_ids is on the meta device"),
    "batch_seq_len_bool": (lambda: SegmentInfo.from_batch([0], True), "seq_len"),
    "batch_seq_len_float": (lambda: SegmentInfo.from_batch([0], 3.0), "seq_len"),
    "batch_seq_len_none": (lambda: SegmentInfo.from_batch([0], None), "seq_len"),
    "indptr_none": (lambda: SegmentInfo.from_indptr(None, [0]), "seg_indptr must be a 1-D sequence"),
    "indptr_empty": (lambda: SegmentInfo.from_indptr([], []), r"seg_indptr must have len\(adapter_ids\) \+ 1"),
    "indptr_2d": (lambda: SegmentInfo.from_indptr(torch.tensor([[0, 2]]), [0]), "seg_indptr must be 1-D"),
    "indptr_float_list": (lambda: SegmentInfo.from_indptr([0, 2.5], [0]), "seg_indptr must be a 1-D sequence of ints"),
    "indptr_wrap": (lambda: SegmentInfo.from_indptr([0, 2**32], [0]), "seg_indptr must fit in int32"),
    "indptr_meta": (lambda: SegmentInfo.from_indptr(torch.tensor([0, 2], device="meta"), [0], num_rows=2),
                    "seg_indptr is on the meta device"),
    "num_rows_bool": (lambda: SegmentInfo.from_indptr([0, 1], [0], num_rows=True), "num_rows"),
    "num_rows_float": (lambda: SegmentInfo.from_indptr([0, 1], [0], num_rows=1.0), "num_rows"),
    "num_rows_negative": (lambda: SegmentInfo.from_indptr([0, 1], [0], num_rows=-1), "num_rows"),
}


@pytest.mark.parametrize("name", list(SEGMENT_ERRORS))
def test_segment_info_bad_input(name):
    build, pattern = SEGMENT_ERRORS[name]
    with pytest.raises(ValueError, match=pattern):
        build()


def test_segment_info_empty_and_meta_without_validation():
    empty = SegmentInfo.from_batch([], 4)
    assert (empty.num_rows, empty.num_segments, empty.max_adapter_id) == (0, 0, -1)
    zero_length = SegmentInfo.from_batch([2, -1], 0)
    assert zero_length.num_rows == 0 and zero_length.seg_indptr.tolist() == [0, 0, 0]
    none = SegmentInfo.from_indptr([0], [])
    assert none.num_rows == 0 and none.row_adapter.numel() == 0
    # meta metadata can be built (e.g. for shape propagation) when nothing has to be read back
    info = SegmentInfo.from_batch(torch.tensor([0, 1], device="meta"), 3, validate=False)
    assert info.device.type == "meta" and info.num_rows == 6 and info.max_adapter_id is None
    # the largest int32 values still pass
    assert SegmentInfo.from_batch([2**31 - 1], 1).max_adapter_id == 2**31 - 1
