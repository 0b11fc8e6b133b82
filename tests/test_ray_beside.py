"""Ray started beside the driver's own set-up (orchestrate.driver.ray_started_beside): up when the
sweep needs it, down as soon as it is not needed or at the end, and a library caller's Ray left as it was."""

from __future__ import annotations

import pytest
import ray

from qsweep.orchestrate.driver import ray_started_beside


def test_ray_comes_up_in_a_thread_and_goes_down_at_the_end():
    assert not ray.is_initialized()
    with ray_started_beside(None) as start:
        start.ready()
        assert ray.is_initialized()
        assert ray.get(ray.remote(lambda: 41 + 1).remote()) == 42
    assert not ray.is_initialized()
    # A second sweep in the same process (a notebook, a test session) gets a Ray of its own.
    with ray_started_beside(None) as start:
        start.ready()
        assert ray.get(ray.remote(lambda: 6 * 7).remote()) == 42
    assert not ray.is_initialized()


def test_ray_stopped_early_is_not_stopped_again():
    with ray_started_beside(None) as start:
        start.ready()
        start.stop()
        assert not ray.is_initialized()
        # A Ray the caller starts after the early stop is the caller's.
        ray.init(include_dashboard=False, log_to_driver=False)
    try:
        assert ray.is_initialized()
    finally:
        ray.shutdown()


def test_a_start_left_unused_is_still_shut_down():
    with ray_started_beside(None):
        pass
    assert not ray.is_initialized()


def test_a_library_callers_ray_is_left_running():
    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        with ray_started_beside(None) as start:
            start.ready()
        assert ray.is_initialized()
    finally:
        ray.shutdown()


def test_an_error_in_the_set_up_still_shuts_ray_down():
    with pytest.raises(RuntimeError, match="tracking store"), ray_started_beside(None):
        raise RuntimeError("the tracking store refused")
    assert not ray.is_initialized()
