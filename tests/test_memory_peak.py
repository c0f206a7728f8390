"""benchmarks/memory_peak.py: replaying the allocator's events to the peak, and the report by site."""

from benchmarks.memory_peak import MIB, live_at_peak, report, site


def ev(action, addr, mib, name="f"):
    return {"action": action, "addr": addr, "size": int(mib * MIB),
            "frames": [{"filename": "/x/torch/nn/functional.py", "line": 1, "name": "linear"},
                       {"filename": f"/s/site-packages/peftchat/model/{name}.py", "line": 7, "name": name}]}


def test_live_at_peak_and_report():
    events = [ev("alloc", 1, 100, "a"), ev("alloc", 2, 50, "b"), ev("free_completed", 1, 100),
              ev("alloc", 3, 120, "c"), ev("alloc", 4, 10, "c"), ev("free_requested", 4, 10)]
    peak, index, live = live_at_peak(events)
    assert (peak, index, sorted(live)) == (180 * MIB, 4, [2, 3, 4])
    lines = report({"device_traces": [events]}).splitlines()
    assert lines[0].startswith("peak above the recording start: 180.0 MiB at event 4 of 6")
    # by site, largest first, torch frames skipped for the first one in peftchat
    assert lines[2].split() == ["130.0", "2", "peftchat/model/c.py:7", "c"]
    assert lines[3].split() == ["50.0", "1", "peftchat/model/b.py:7", "b"]
    assert lines[4] == "stack of the allocation that reached the peak:"
    assert site([]) == "(no stack)"
