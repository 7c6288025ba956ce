"""The build-ahead thread (:mod:`service.crowd.ahead`): queued once per campaign, survives a
failing build, and can be waited for."""

from __future__ import annotations

import threading

from service.crowd.ahead import AheadBuilder


def test_a_campaign_queued_twice_is_built_once_and_failures_do_not_stop_the_thread():
    gate = threading.Event()
    built: list[int] = []

    def build(campaign_id: int) -> None:
        gate.wait(10)  # hold the first build so the next requests pile up behind it
        built.append(campaign_id)
        if campaign_id == 2:
            raise RuntimeError("database went away")

    builder = AheadBuilder(build)
    builder.request(1)
    for campaign_id in (2, 2, 3, 2):
        builder.request(campaign_id)
    assert not builder.wait_idle(0.2)  # still holding at the gate
    gate.set()
    assert builder.wait_idle(10)
    assert built == [1, 2, 3]
    builder.request(2)  # the thread outlived campaign 2's failure
    assert builder.wait_idle(10)
    assert built == [1, 2, 3, 2]
