"""The local shuffle buffer is the configured size: never capped to the batch size (see worker_env)."""

from raytrain_ssl.stages.worker_env import shuffle_buffer_rows


def test_shuffle_buffer_is_the_configured_size():
    assert shuffle_buffer_rows(2048, 128, steps_per_epoch=5) == 2048  # digits at 128 per worker
    assert shuffle_buffer_rows(0, 64, steps_per_epoch=100) == 0  # off stays off
