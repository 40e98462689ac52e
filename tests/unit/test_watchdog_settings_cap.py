from __future__ import annotations

from appliance import config
from appliance.watchdog.settings import from_config


def test_a_check_never_takes_longer_than_the_interval() -> None:
    one_s = config.parse('[watchdog]\ninterval = "1s"\ntimeout = "2s"\nslow_threshold = "1s"\n')
    s = from_config(one_s.watchdog)
    assert (s.interval, s.timeout) == (1.0, 1.0)
    assert from_config(config.parse("").watchdog).timeout == 2.0
