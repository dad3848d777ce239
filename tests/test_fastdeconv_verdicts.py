"""FastDeconv's asynchronous finiteness verdicts (CUDA) tested on the CPU: the queue with fake events, and the
layer's real code path with the few torch.cuda calls it makes replaced by a fake CUDA runtime."""
import contextlib
import copy
import pickle
import threading
import warnings

import pytest
import torch

import aecr_ops
from aecr_ops import fastdeconv as module



# ---------------------------------------------------------------------------------------------------------------
# The queue, with fake events

class Event:
    """An event that completes only when the test says so (or when waited for)."""

    def __init__(self):
        self.done = False
        self.waits = 0

    def query(self):
        return self.done

    def synchronize(self):
        self.waits += 1
        self.done = True

    def __reduce__(self):
        raise TypeError("CUDA events neither copy nor pickle")


class Flag:
    """A pinned byte that is valid only once its event has completed (the copy has landed)."""

    def __init__(self, event, finite):
        self.event, self.finite = event, finite

    def __bool__(self):
        assert self.event.done, "the flag was read before its event completed"
        return self.finite


def entry(finite):
    event = Event()
    return Flag(event, finite), event


def test_queue_hands_back_completed_verdicts_oldest_first_and_once():
    q = module._PendingVerdicts()
    entries = [entry(f) for f in (False, True, False)]
    for e in entries:
        assert q.push(*e) == []
    assert q.poll() == [] and len(q) == 3  # nothing back yet: the flags are not read
    for _, event in entries:
        event.done = True
    assert q.poll() == [False, True, False]
    assert q.poll() == [] and len(q) == 0


def test_queue_bad_then_good_neither_back_at_first():
    q = module._PendingVerdicts()
    (bad_flag, bad), (good_flag, good) = entry(False), entry(True)
    q.push(bad_flag, bad)
    q.push(good_flag, good)
    for _ in range(3):
        assert q.poll() == []
    good.done = bad.done = True
    assert q.poll() == [False, True]
    assert q.poll() == []


def test_queue_newer_verdicts_back_before_an_older_one():
    # Events on different streams or devices complete in any order: what is back is handed back, the rest waits.
    q = module._PendingVerdicts()
    entries = [entry(f) for f in (False, True, True, False)]
    for e in entries:
        q.push(*e)
    entries[2][1].done = True
    assert q.poll() == [True] and len(q) == 3
    entries[3][1].done = True
    entries[1][1].done = True
    assert q.poll() == [True, False] and len(q) == 1
    assert q.poll() == [] and len(q) == 1
    entries[0][1].done = True
    assert q.poll() == [False] and len(q) == 0


def test_queue_bound_waits_for_the_oldest_only():
    q = module._PendingVerdicts(limit=3)
    entries = [entry(f) for f in (False, True, True, True, False)]
    for e in entries[:3]:
        assert q.push(*e) == []
    assert q.push(*entries[3]) == [False]  # past the limit: waits for the oldest, which was not back
    assert [e[1].waits for e in entries] == [1, 0, 0, 0, 0] and len(q) == 3
    assert q.push(*entries[4]) == [True]
    assert [e[1].waits for e in entries] == [1, 1, 0, 0, 0] and len(q) == 3
    assert q.poll(wait=True) == [True, True, False] and len(q) == 0
    assert [e[1].waits for e in entries] == [1, 1, 1, 1, 1]


def test_queue_limit_must_be_positive():
    with pytest.raises(ValueError, match="limit"):
        module._PendingVerdicts(limit=0)


def test_queue_copies_and_pickles_are_empty():
    q = module._PendingVerdicts(limit=5)
    q.push(*entry(False))
    for other in (copy.copy(q), copy.deepcopy(q), pickle.loads(pickle.dumps(q))):
        assert len(other) == 0 and other.limit == 5
        other.push(*entry(True))
        assert len(other) == 1
    assert len(q) == 1


def test_queue_from_several_threads_hands_back_every_verdict_once():
    q = module._PendingVerdicts(limit=4)
    handed_back, lock = [], threading.Lock()

    def worker(k):
        for i in range(300):
            flag, event = entry(bool(i % 3))
            event.done = (i + k) % 2 == 0
            got = q.push(flag, event) + q.poll()
            with lock:
                handed_back.extend(got)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    handed_back += q.poll(wait=True)
    assert len(handed_back) == 1200 and handed_back.count(False) == 400


# ---------------------------------------------------------------------------------------------------------------
# The layer, with a fake CUDA runtime

class FakeCudaBool:
    """The running-update op's verdict as the layer sees it on CUDA: a 0-d bool on a CUDA device."""
    is_cuda = True

    def __init__(self, value, device):
        self.value, self.device = value, device


class FakeStream:
    def __init__(self, index):
        self.index = index
        self.copies = []  # copies queued on the stream and not yet followed by an event


class FakeEvent:
    def __init__(self, cuda):
        self.cuda, self.stream, self.covers, self.done = cuda, None, [], False
        self.waits = 0

    def record(self, stream=None):
        if stream is None:  # torch.cuda.Event.record's default: the current device's current stream
            stream = self.cuda.streams[self.cuda.current]
        self.stream, self.covers, stream.copies = stream, stream.copies, []
        self.cuda.events.append(self)

    def query(self):
        assert not self.cuda.capturing_now(), "an event was queried during a CUDA graph capture"
        return self.done

    def synchronize(self):
        assert not self.cuda.capturing_now(), "an event was waited for during a CUDA graph capture"
        self.waits += 1
        self.complete()

    def complete(self):
        self.done = True
        for flag in self.covers:
            flag.landed = True

    def __reduce__(self):
        raise TypeError("CUDA events neither copy nor pickle")


class FakePinnedFlag:
    """A pinned host byte that an asynchronous device-to-host copy writes: valid only once an event recorded
    after the copy, on the copy's stream, has completed."""

    def __init__(self, cuda):
        self.cuda, self.value, self.landed = cuda, None, False
        self.allocated_on = cuda.current

    def copy_(self, src, non_blocking=False):
        assert non_blocking
        # As PyTorch does: a device-to-host copy is queued on the current stream of the source's device.
        self.cuda.streams[src.device.index].copies.append(self)
        self.value = src.value

    def __bool__(self):
        assert self.landed, "the flag was read before its copy landed"
        return self.value


class FakeCuda:
    """Stands in for the torch.cuda calls the layer makes; the layer's buffers stay on the CPU, where the real
    running-update op runs (so they are really protected), its verdict being presented as on ``device``."""

    def __init__(self, monkeypatch, device=0, current=0):
        self.device, self.current, self.capturing = torch.device("cuda", device), current, set()
        self.streams = {i: FakeStream(i) for i in range(4)}
        self.events = []
        real_update = torch.ops.aecr_ops.fastdeconv_update_running
        real_empty = torch.empty

        def update(*args):
            return FakeCudaBool(bool(real_update(*args)), self.device)

        def empty(*args, **kwargs):
            if kwargs.pop("pin_memory", False):
                return FakePinnedFlag(self)
            return real_empty(*args, **kwargs)

        @contextlib.contextmanager
        def device_context(d):
            previous, self.current = self.current, torch.device(d).index
            try:
                yield
            finally:
                self.current = previous

        def current_stream(d=None):
            return self.streams[self.current if d is None else torch.device(d).index]

        monkeypatch.setattr(torch.ops.aecr_ops, "fastdeconv_update_running", update)
        monkeypatch.setattr(torch, "empty", empty)
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", self.capturing_now)
        monkeypatch.setattr(torch.cuda, "device", device_context)
        monkeypatch.setattr(torch.cuda, "current_stream", current_stream)
        monkeypatch.setattr(torch.cuda, "Event", lambda *a, **k: FakeEvent(self))

    def capturing_now(self):
        return self.current in self.capturing


LIMIT = 16  # verdicts a layer lets the host run ahead by, as the class docstring says


def queued(net):
    return len(net._verdicts)


def batch(finite=True):
    x = torch.randn(2, 3, 10, 10)
    if not finite:
        x[1, 2, 4, 5] = float("nan")
    return x


def late_warnings(record):
    found = [w for w in record if issubclass(w.category, RuntimeWarning) and "not finite" in str(w.message)]
    assert all("reported late" in str(w.message) for w in found)
    return len(found)


@contextlib.contextmanager
def recording():
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        yield record


def layer():
    return aecr_ops.FastDeconv(3, 3, 3, padding=1)


def test_bad_then_good_batch_neither_back_at_first_warn_exactly_once(monkeypatch):
    cuda = FakeCuda(monkeypatch)
    net = layer()
    with recording() as record:
        net(batch())
        cuda.events[0].complete()
        mean, deconv = net.running_mean.clone(), net.running_deconv.clone()
        net(batch(finite=False))
        assert torch.equal(net.running_mean, mean) and torch.equal(net.running_deconv, deconv)
        net(batch())
        net(batch())
        assert late_warnings(record) == 0
        cuda.events[1].complete()  # the bad batch, then the good one
        cuda.events[2].complete()
        net(batch())
        assert late_warnings(record) == 1
        net(batch(finite=False))
        for event in cuda.events:
            event.complete()
        net.eval()
        net(batch())  # an eval call polls too, and queues nothing
        assert late_warnings(record) == 2
        assert queued(net) == 0


def test_bad_batch_back_only_after_many_steps_is_still_reported(monkeypatch):
    cuda = FakeCuda(monkeypatch)
    net = layer()
    with recording() as record:
        net(batch(finite=False))
        for _ in range(12):
            net(batch()).sum().backward()
            cuda.events[-1].complete()  # later batches come back first (another stream, say)
        # Still queued: the bad batch, and the last step's verdict (back, but no call has polled since).
        assert late_warnings(record) == 0
        cuda.events[0].complete()
        net(batch())
        assert late_warnings(record) == 1 and cuda.events[0].waits == 0
        for event in cuda.events:
            event.complete()
        net(batch())
        assert late_warnings(record) == 1
        assert queued(net) == 1  # this call's own verdict


def test_every_non_finite_batch_warns_exactly_once(monkeypatch):
    cuda = FakeCuda(monkeypatch)
    net = layer()
    pattern = [True, False, False, True, False, True, True, False]
    with recording() as record:
        for finite in pattern:
            net(batch(finite))
            if len(cuda.events) % 3 == 0:
                for event in cuda.events[:-1]:
                    event.complete()
        assert late_warnings(record) < pattern.count(False)
        for event in cuda.events:
            event.complete()
        net(batch())
        assert late_warnings(record) == pattern.count(False)


def test_host_far_ahead_waits_for_the_oldest_verdict(monkeypatch):
    cuda = FakeCuda(monkeypatch)
    net = layer()
    limit = LIMIT
    with recording() as record:
        net(batch(finite=False))
        for _ in range(limit - 1):
            net(batch())
        assert late_warnings(record) == 0
        assert all(event.waits == 0 for event in cuda.events)
        net(batch())  # one more than the limit: this call waits for the oldest, the bad batch
        assert late_warnings(record) == 1
        assert [event.waits for event in cuda.events] == [1] + [0] * limit
        net(batch())
        assert late_warnings(record) == 1
        assert [event.waits for event in cuda.events] == [1, 1] + [0] * limit
    assert queued(net) == limit
    assert module._PENDING_LIMIT == LIMIT


def test_verdict_is_brought_back_on_the_layer_device_not_the_current_one(monkeypatch):
    # The layer on cuda:1, the current device cuda:0: the pinned flag is allocated, and the event recorded, on
    # cuda:1's current stream, behind the copy, and the current device is left alone.
    cuda = FakeCuda(monkeypatch, device=1, current=0)
    net = layer()
    with recording() as record:
        net(batch(finite=False))
        assert cuda.current == 0
        (event,) = cuda.events
        assert event.stream is cuda.streams[1] and len(event.covers) == 1
        assert event.covers[0].allocated_on == 1
        net(batch())
        assert late_warnings(record) == 0
        event.complete()
        net(batch())  # reads the flag, which must have landed
        assert late_warnings(record) == 1


def test_nothing_is_queued_or_queried_during_a_graph_capture(monkeypatch):
    cuda = FakeCuda(monkeypatch)
    net = layer()
    with recording() as record:
        net(batch(finite=False))  # before the capture (a warm-up step): queued
        assert len(cuda.events) == 1
        cuda.events[0].complete()
        cuda.capturing.add(0)
        mean, deconv = net.running_mean.clone(), net.running_deconv.clone()
        y = net(batch(finite=False))  # neither polls (queries assert) nor creates a flag or an event
        y.sum().backward()
        assert len(cuda.events) == 1 and late_warnings(record) == 0
        assert queued(net) == 1
        assert torch.equal(net.running_mean, mean) and torch.equal(net.running_deconv, deconv)
        net(batch())
        assert len(cuda.events) == 1 and late_warnings(record) == 0
        cuda.capturing.clear()
        net(batch())  # after the capture: the warm-up's verdict is reported
        assert late_warnings(record) == 1 and len(cuda.events) == 2


def test_capture_on_the_layer_device_while_another_is_current(monkeypatch):
    # The current stream of cuda:1 captures (the layer's kernels go there) while cuda:0 is current.
    cuda = FakeCuda(monkeypatch, device=1, current=0)
    net = layer()
    cuda.capturing.add(1)
    net(batch())
    assert cuda.events == []
    assert queued(net) == 0


def test_copies_start_without_pending_verdicts(monkeypatch):
    cuda = FakeCuda(monkeypatch)
    net = layer()
    net(batch(finite=False))  # the layer now holds an event, which neither copies nor pickles
    copies = [copy.deepcopy(net), pickle.loads(pickle.dumps(net))]
    cuda.events[0].complete()
    with recording() as record:
        for other in copies:
            assert torch.equal(other.running_deconv, net.running_deconv)
            other(batch())  # a copy does not report the original's batch
        assert late_warnings(record) == 0
        net(batch())  # the original still does
        assert late_warnings(record) == 1
    assert all(queued(other) == 1 for other in copies)  # their own verdict, not the original's


def test_pickles_of_the_earlier_layer_load():
    # Earlier versions pickled `_pending_finite` (always None) and had no queue.
    net = layer()
    state = dict(net.__dict__)
    del state["_verdicts"]
    state["_pending_finite"] = None
    restored = aecr_ops.FastDeconv.__new__(aecr_ops.FastDeconv)
    restored.__setstate__(state)
    assert not hasattr(restored, "_pending_finite") and len(restored._verdicts) == 0
    assert restored(batch()).shape == (2, 3, 10, 10)


def test_cpu_warning_is_immediate_and_not_late():
    net = layer()
    with recording() as record:
        net(batch(finite=False))
    (w,) = [w for w in record if "not finite" in str(w.message)]
    assert "late" not in str(w.message) and w.category is RuntimeWarning


@pytest.mark.slow
def test_torch_compile_skips_the_check_with_verdicts_pending():
    torch._dynamo.reset()
    net = layer()
    flag, event = entry(False)

    def query():
        raise AssertionError("compiled code polled the verdicts")

    event.query = query
    net._verdicts.push(flag, event)
    compiled = torch.compile(net, fullgraph=True)
    with recording() as record:
        compiled(batch()).sum().backward()
        compiled(batch(finite=False))
    assert len(net._verdicts) == 1 and late_warnings(record) == 0
