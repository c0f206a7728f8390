from benchmarks.memory_peak import live_at_peak, report, site

def ev(action, addr, size, name="f"):
    return {"action": action, "addr": addr, "size": size,
            "frames": [{"filename": "/x/torch/nn/functional.py", "line": 1, "name": "linear"},
                       {"filename": f"/s/site-packages/peftchat/model/{name}.py", "line": 7, "name": name}]}

def test_live_at_peak_and_report():
    events = [ev("alloc", 1, 100, "a"), ev("alloc", 2, 50, "b"), ev("free_completed", 1, 100),
              ev("alloc", 3, 120, "c"), ev("alloc", 4, 10, "c"), ev("free_requested", 4, 10)]
    peak, index, live = live_at_peak(events)
    assert (peak, index, sorted(live)) == (180, 4, [2, 3, 4])
    text = report({"device_traces": [events]})
    assert "peftchat/model/c.py:7 c" in text.splitlines()[2] and "130" not in text.splitlines()[1]
    assert site([]) == "(no stack)"
