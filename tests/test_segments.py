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
