"""Tests for jaxvid.data.buckets (assigning clips to buckets, the batch plan) and for
config.buckets (batch sizes from the token budget, explicit sizes, errors)."""

import numpy as np
import pytest

from conftest import SMALL, TINY
from jaxvid import config
from jaxvid.data import buckets
from jaxvid.data.buckets import Bucket
from jaxvid.errors import UserError

B = [Bucket(16, 32, 32, 8), Bucket(8, 32, 32, 16), Bucket(16, 32, 48, 8), Bucket(8, 48, 32, 16),
     Bucket(1, 32, 32, 64), Bucket(1, 32, 48, 64)]


@pytest.mark.parametrize("height,width,frames,is_image,want", [
    (720, 720, 100, False, 0),      # square, long: the longest square bucket
    (720, 720, 12, False, 1),       # square, too short for 16 frames: the 8-frame one
    (720, 720, 7, False, None),     # too short for any video bucket (never a one-frame bucket)
    (720, 1080, 16, False, 2),      # 2:3 exactly, just long enough
    (720, 1280, 16, False, 2),      # 16:9 is closest to 2:3
    (720, 1280, 15, False, 1),      # no 2:3 bucket of <= 15 frames: the closest aspect that fits (square)
    (1280, 720, 100, False, 3),     # portrait: only an 8-frame portrait bucket
    (1000, 1001, 100, False, 0),    # nearly square
    (720, 720, 1, True, 4),         # images only to one-frame buckets
    (720, 1280, 1, True, 5),
    (1280, 720, 1, True, 4),        # no portrait image bucket: square is closer than 2:3 landscape
])
def test_assign_closest_aspect_then_longest(height, width, frames, is_image, want):
  assert buckets.assign(height, width, frames, is_image, B) == want


def test_assign_more_pixels_breaks_ties_and_images_need_a_one_frame_bucket():
  same_aspect = [Bucket(8, 16, 16, 8), Bucket(8, 32, 32, 8), Bucket(4, 64, 64, 8)]
  assert buckets.assign(100, 100, 8, False, same_aspect) == 1      # most frames, then most pixels
  assert buckets.assign(100, 100, 4, False, same_aspect) == 2
  videos_only = [Bucket(4, 16, 16, 8), Bucket(4, 16, 24, 8)]
  assert buckets.assign(100, 100, 1, True, videos_only) is None
  # Without any multi-frame bucket (image-only training), videos go to one-frame buckets.
  images_only = [Bucket(1, 16, 16, 8), Bucket(1, 16, 24, 8)]
  assert buckets.assign(100, 150, 40, False, images_only) == 1
  assert buckets.assign(100, 150, 0, False, images_only) is None
  assert buckets.assign(100, 100, 100, False, []) is None


def test_aspect_is_compared_in_log_space():
  pair = [Bucket(4, 16, 32, 8), Bucket(4, 32, 16, 8)]     # 1:2 and 2:1
  assert buckets.assign(10, 19, 4, False, pair) == 0
  assert buckets.assign(19, 10, 4, False, pair) == 1
  # 1:1 is exactly between 1:2 and 2:1 in log space: a tie, broken by the bucket order.
  assert buckets.assign(10, 10, 4, False, pair) == 0
  assert buckets.assign(10, 10, 4, False, pair[::-1]) == 0


def test_batch_plan_covers_every_item_each_epoch_in_one_bucket_per_batch():
  bucket_of = [0] * 10 + [1] * 3 + [2] * 5        # bucket 1 smaller than its batch
  sizes = (4, 4, 2)
  plan = buckets.BatchPlan(bucket_of, sizes, seed=3)
  assert plan.batches_per_epoch == 3 + 1 + 3
  assert len(plan) >= 10**6 * plan.batches_per_epoch
  for epoch in range(3):
    seen = [[] for _ in sizes]
    for j in range(epoch * 7, (epoch + 1) * 7):
      b, items = plan[j]
      assert items.dtype == np.int64 and len(items) == sizes[b]
      assert all(bucket_of[i] == b for i in items)
      seen[b] += list(items)
    for b, members in enumerate(plan.members):
      assert set(seen[b]) == set(members)                  # every item of every bucket, every epoch
      assert len(seen[b]) == -(-len(members) // sizes[b]) * sizes[b]   # wrapped to whole batches
  orders = [[int(x) for j in range(e * 7, (e + 1) * 7) for x in plan[j][1]] for e in range(2)]
  assert orders[0] != orders[1]                            # reshuffled each epoch


def test_batch_plan_is_a_pure_function_of_seed_and_index():
  bucket_of = np.random.default_rng(0).integers(0, 3, 50)
  a, b = buckets.BatchPlan(bucket_of, (4, 2, 8), 7), buckets.BatchPlan(bucket_of, (4, 2, 8), 7)
  order = [30, 2, 5, 2, 61, 0, 30]                         # any access order, across epochs
  for j in order:
    assert a[j][0] == b[j][0] and np.array_equal(a[j][1], b[j][1])
  forward = [a[j] for j in range(40)]
  backward = [b[j] for j in reversed(range(40))][::-1]
  for (ba, ia), (bb, ib) in zip(forward, backward):
    assert ba == bb and np.array_equal(ia, ib)
  other = buckets.BatchPlan(bucket_of, (4, 2, 8), 8)
  assert any(other[j][0] != a[j][0] or not np.array_equal(other[j][1], a[j][1]) for j in range(10))
  with pytest.raises(ValueError, match="at least one item"):
    buckets.BatchPlan([], (4,), 0)


def test_process_block():
  assert buckets.process_block(8, 0, 1) == slice(0, 8)
  assert [buckets.process_block(8, p, 4) for p in range(4)] == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)]
  with pytest.raises(ValueError, match="does not split over 3 processes"):
    buckets.process_block(8, 0, 3)


def _cfg(*overrides):
  return config.load(TINY, SMALL + list(overrides))


def test_config_buckets_default_is_the_video_shape():
  # SMALL: video 4x16x16, train.batch_size 8.
  assert config.buckets(_cfg()) == [(4, 16, 16, 8)]
  assert config.buckets(_cfg(), batch_shards=8) == [(4, 16, 16, 8)]


def test_config_buckets_share_the_token_budget():
  # patch (1, 4, 4): video.* is 4x4x4 = 64 tokens, the budget 8 x 64 = 512 tokens per batch.
  cfg = _cfg("--config.model.patch=(1,4,4)",
             "--config.data.buckets=((4,16,16),(4,16,24),(1,16,16),(8,32,32),(2,16,16,6))")
  assert config.buckets(cfg) == [(4, 16, 16, 8), (4, 16, 24, 5), (1, 16, 16, 32), (8, 32, 32, 1),
                                 (2, 16, 16, 6)]
  # Rounded down to a multiple of the batch shards, at least one per shard; explicit sizes kept.
  cfg = _cfg("--config.model.patch=(1,4,4)",
             "--config.data.buckets=((4,16,16),(4,16,24),(1,16,16),(8,32,32),(2,16,16,6))")
  assert config.buckets(cfg, batch_shards=2) == [(4, 16, 16, 8), (4, 16, 24, 4), (1, 16, 16, 32),
                                                 (8, 32, 32, 2), (2, 16, 16, 6)]
  cfg = _cfg("--config.model.patch=(1,4,4)", "--config.data.buckets=((4,16,16),(4,16,24),(1,16,16),(8,32,32))")
  assert config.buckets(cfg, batch_shards=8) == [(4, 16, 16, 8), (4, 16, 24, 8), (1, 16, 16, 32), (8, 32, 32, 8)]
  # Token counts per batch stay within the budget (up to one clip per shard).
  for frames, height, width, batch in config.buckets(cfg, batch_shards=2):
    assert batch * config.num_tokens(cfg, (frames, height, width)) <= 512 or batch == 2


def test_config_buckets_accept_lists_and_validate_checks_them():
  cfg = _cfg("--config.data.buckets=[[4,16,16],[4,16,32,4]]")
  assert config.buckets(cfg) == [(4, 16, 16, 8), (4, 16, 32, 4)]
  config.validate(cfg, num_devices=4, train=True)
  with pytest.raises(UserError, match=r"batch 4 is not divisible by mesh.data\*mesh.fsdp=8"):
    config.validate(cfg, num_devices=8, train=True)


@pytest.mark.parametrize("buckets_value,batch_shards,words", [
    ("((4,16,16),(4,16))", 1, r"entry \(4, 16\) must be \(frames, height, width\)"),
    ("((4,16,16,8,1),)", 1, "must be .frames, height, width. or"),
    ("((4,16,0),)", 1, "of positive ints"),
    ("((4,16,16,0),)", 1, "of positive ints"),
    ("((4.0,16,16),)", 1, "of positive ints"),
    ("((3,16,16),)", 1, r"frames=3 is not divisible by its patch size 2 \(model.patch=\(2, 4, 4\)\)"),
    ("((4,18,16),)", 1, "height=18 is not divisible by its patch size 4"),
    ("((4,16,16,6),)", 4, r"batch 6 is not divisible by mesh.data\*mesh.fsdp=4"),
    ("((4,16,16),(4,16,16,8))", 1, "lists a shape twice"),
])
def test_config_buckets_user_errors(buckets_value, batch_shards, words):
  cfg = _cfg(f"--config.data.buckets={buckets_value}")
  with pytest.raises(UserError, match=words):
    config.buckets(cfg, batch_shards)


def test_one_frame_buckets_need_a_time_patch_of_one():
  with pytest.raises(UserError, match="frames=1 is not divisible by its patch size 2"):
    config.buckets(_cfg("--config.data.buckets=((4,16,16),(1,16,16))"))
  assert config.buckets(_cfg("--config.data.buckets=((4,16,16),(1,16,16))", "--config.model.patch=(1,4,4)"))[1] \
      == (1, 16, 16, 32)
