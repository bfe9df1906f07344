import pytest

from hf_knnlm.lm.windows import count_windows, sliding_windows


@pytest.mark.parametrize(
    "n, max_length, stride", [(10, 4, 2), (11, 4, 3), (100, 16, 5), (3, 16, 5), (2, 4, 1), (64, 64, 32)]
)
def test_every_target_once_with_enough_context(n, max_length, stride):
    windows = list(sliding_windows(n, max_length, stride))
    targets = [t for w in windows for t in range(w.first_target, w.end)]
    assert targets == list(range(1, n))
    assert len(windows) == count_windows(n, max_length, stride)
    for w in windows:
        assert w.end - w.begin <= max_length and w.first_target > w.begin
    for w in windows[1:]:
        assert w.first_target - w.begin >= max_length - stride


@pytest.mark.parametrize("max_length, stride", [(1, 1), (8, 0), (8, 8), (8, 9)])
def test_bad_windows_are_refused(max_length, stride):
    with pytest.raises(ValueError):
        list(sliding_windows(10, max_length, stride))
