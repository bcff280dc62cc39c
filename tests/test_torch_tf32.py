"""The torch backend computes true FP32 on CUDA: TF32 off while any runner computes, and the
user's process-wide setting back once the last one is done. The switches exist on every build
of PyTorch, so this runs on the CPU too; the arithmetic itself is checked in test_gpu.py."""

import threading

import pytest

from trufor_trt.engine.torch_runner import exact_fp32_on_cuda

torch = pytest.importorskip("torch")


def _switches():
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


@pytest.fixture
def tf32_on():
    saved = _switches()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_tf32_is_off_inside_and_restored_after(tf32_on):
    with exact_fp32_on_cuda():
        assert _switches() == (False, False)
    assert _switches() == (True, True)


def test_overlapping_runners_on_threads_keep_tf32_off_until_the_last_is_done(tf32_on):
    first_inside, second_inside, first_done = threading.Event(), threading.Event(), threading.Event()
    seen = []

    def first():
        with exact_fp32_on_cuda():
            first_inside.set()
            second_inside.wait(5)
        first_done.set()

    def second():
        first_inside.wait(5)
        with exact_fp32_on_cuda():
            second_inside.set()
            first_done.wait(5)
            seen.append(_switches())  # the first runner has left; this one still computes

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert seen == [(False, False)]
    assert _switches() == (True, True)
