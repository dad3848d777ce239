"""aecr_model.host_memory: the scoped glibc settings that keep freed memory in the process during a forward."""
import json
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

from aecr_model import AECRNet, dehaze_tensor, host_memory
from aecr_model.host_memory import M_MMAP_MAX, M_MMAP_THRESHOLD, M_TRIM_THRESHOLD


class FakeLibc:
    """Records mallopt and malloc_trim calls instead of making them."""

    def __init__(self):
        self.calls = []

    def mallopt(self, param, value):
        self.calls.append(("mallopt", param, value))
        return 1

    def malloc_trim(self, pad):
        self.calls.append(("malloc_trim", pad))
        return 1


@pytest.fixture
def fake_libc(monkeypatch):
    libc = FakeLibc()
    monkeypatch.setattr(host_memory, "glibc", lambda: libc)
    for variable in ("GLIBC_TUNABLES", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_MAX_"):
        monkeypatch.delenv(variable, raising=False)
    return libc


SETTLED = [("mallopt", M_MMAP_THRESHOLD, 32 << 20), ("mallopt", M_TRIM_THRESHOLD, 64 << 20),
           ("mallopt", M_MMAP_MAX, 65536), ("malloc_trim", 0)]
RETAINING = [("mallopt", M_TRIM_THRESHOLD, 2 ** 31 - 1), ("mallopt", M_MMAP_MAX, 0)]


def test_nested_scopes_set_once_and_restore_once_at_the_outermost_exit(fake_libc):
    with host_memory.retain_freed_memory():
        assert fake_libc.calls == RETAINING and host_memory.retaining()
        with host_memory.retain_freed_memory():
            pass
        assert fake_libc.calls == RETAINING and host_memory.retaining()
    assert fake_libc.calls == RETAINING + SETTLED
    assert not host_memory.retaining()


def test_the_settings_come_back_when_the_body_raises(fake_libc):
    with pytest.raises(KeyError):
        with host_memory.retain_freed_memory():
            raise KeyError("x")
    assert fake_libc.calls == RETAINING + SETTLED and not host_memory.retaining()


def test_a_disabled_scope_touches_nothing(fake_libc):
    with host_memory.retain_freed_memory(enabled=False):
        assert not host_memory.retaining()
    assert fake_libc.calls == []


def test_concurrent_scopes_share_one(fake_libc):
    inside, release = threading.Barrier(3), threading.Event()

    def worker():
        with host_memory.retain_freed_memory():
            inside.wait()
            release.wait()

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    inside.wait()
    assert fake_libc.calls == RETAINING
    release.set()
    for t in threads:
        t.join()
    assert fake_libc.calls == RETAINING + SETTLED


@pytest.mark.parametrize("environ, expected", [
    ({}, {M_MMAP_THRESHOLD: 32 << 20, M_TRIM_THRESHOLD: 64 << 20, M_MMAP_MAX: 65536}),
    ({"MALLOC_TRIM_THRESHOLD_": "1000000"}, {M_MMAP_THRESHOLD: 131072, M_TRIM_THRESHOLD: 1000000, M_MMAP_MAX: 65536}),
    ({"GLIBC_TUNABLES": "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=0x100000",
      "MALLOC_MMAP_MAX_": "7"}, {M_MMAP_THRESHOLD: 131072, M_TRIM_THRESHOLD: 1 << 20, M_MMAP_MAX: 0}),
    ({"MALLOC_MMAP_THRESHOLD_": "junk"}, {M_MMAP_THRESHOLD: 32 << 20, M_TRIM_THRESHOLD: 64 << 20, M_MMAP_MAX: 65536}),
])
def test_restored_settings_follow_the_environment(environ, expected):
    assert host_memory.restored_settings(environ) == expected


PASSES_SCRIPT = textwrap.dedent("""
    import json, resource, torch
    from aecr_model import host_memory

    def minor_faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    def forward_like_pass():
        # Large tensors (40 to 72 MiB, all above glibc's largest mmap threshold) made, written and freed in turn,
        # while small objects made in between stay alive, so that a freed block need not border the heap's top.
        before = minor_faults()
        kept, previous = [], None
        for numel in [10 << 20, 18 << 20, 10 << 20, 14 << 20, 18 << 20, 10 << 20]:
            current = torch.ones(numel)
            kept.append(torch.ones(64))
            del previous
            previous = current
        del previous
        return minor_faults() - before

    outside = [forward_like_pass() for _ in range(2)]
    with host_memory.retain_freed_memory():
        inside = [forward_like_pass() for _ in range(3)]
    print(json.dumps([outside, inside]))
""")


@pytest.mark.skipif(host_memory.glibc() is None, reason="glibc only")
def test_inside_a_scope_passes_come_to_reuse_the_memory_of_those_before():
    # In a fresh process: how a freed block is reused depends on everything the process allocated before.
    done = subprocess.run([sys.executable, "-c", PASSES_SCRIPT], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    outside, inside = json.loads(done.stdout)
    pages = (80 << 20) // 4096  # the 80 MiB of tensors a pass writes, at the least
    assert min(outside) > pages  # without the scope every large tensor is mapped afresh each time
    assert inside[0] > pages // 4  # the first passes inside fault their memory in (the heap settles in one or two)
    # ... and then a pass reuses it: at most one of its tensors (72 MiB of its 320, under a quarter) faulted in
    # afresh, where glibc's free blocks were too fragmented for it (seen once in a fresh CI run: 40 MiB)
    assert inside[-1] < 0.25 * min(outside)


def test_dehaze_tensor_gives_the_same_image_with_and_without_the_scope():
    torch.manual_seed(0)
    model = AECRNet(ngf=8).eval()
    hazy = torch.rand(1, 3, 30, 42)
    with_scope = dehaze_tensor(model, hazy)
    assert torch.equal(with_scope, dehaze_tensor(model, hazy, retain_memory=False))
    assert not host_memory.retaining()
