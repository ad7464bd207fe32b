"""The local shuffle buffer: never more than an eighth of a worker's epoch, never less than a batch."""

from raytrain_ssl.stages.worker_env import shuffle_buffer_rows


def test_shuffle_buffer_is_capped_by_the_epoch():
    assert shuffle_buffer_rows(2048, 128, steps_per_epoch=1000) == 2048  # a big epoch keeps the setting
    assert shuffle_buffer_rows(2048, 128, steps_per_epoch=39) == 624  # CIFAR subset: 4,992 rows -> 1/8
    assert shuffle_buffer_rows(2048, 64, steps_per_epoch=5) == 64  # digits: at least one batch
    assert shuffle_buffer_rows(0, 64, steps_per_epoch=100) == 0  # off stays off
