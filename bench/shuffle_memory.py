"""What Beam's local runner holds per image in augment's shuffles: a record per image, or per group.

    python bench/shuffle_memory.py [--records 20000]

The local runner (FnApiRunner, the DirectRunner's engine) keeps every GroupByKey's and Reshuffle's
input in its own process until the next stage reads it, each element decoded into a Python object
(GroupingBuffer), and sends the next stage its share as one block. augment's two shuffles (the
dedupe, then each split's wait for the transform graph) once carried a record (`Checked`) per
image; they now carry the records in groups by hash prefix (256): the dedupe as a combiner whose
accumulator is a dict per group and worker, the wait as a list per group. The records are the same
objects either way; a group saves each element's own key, list and window. Measured with tracemalloc
on Beam's own GroupingBuffer; prints bytes held per image both ways and the ratio.
"""
from __future__ import annotations

import argparse
import hashlib
import random
import tracemalloc

from apache_beam import coders
from apache_beam.coders.coder_impl import create_OutputStream
from apache_beam.runners.portability.fn_api_runner.execution import GroupingBuffer
from apache_beam.transforms import core, trigger
from apache_beam.transforms.window import GlobalWindows

from kflift.components.augment import GROUP_PREFIX, Checked


def held_bytes(pairs: list, reshuffle: bool, value_coder=coders.FastPrimitivesCoder()) -> int:
    """Bytes the runner's buffer holds for these (key, value) pairs, as a GroupByKey (the dedupe) or a
    Reshuffle (which reifies each value's timestamp under a trigger: non-default windowing)."""
    any_coder = coders.FastPrimitivesCoder()
    pre = coders.WindowedValueCoder(coders.TupleCoder([any_coder, value_coder]), coders.coders.GlobalWindowCoder())
    post = coders.WindowedValueCoder(coders.TupleCoder([any_coder, coders.IterableCoder(value_coder)]),
                                     coders.coders.GlobalWindowCoder())
    windowing = (core.Windowing(GlobalWindows(), triggerfn=trigger.Always(),
                                accumulation_mode=trigger.AccumulationMode.DISCARDING)
                 if reshuffle else core.Windowing(GlobalWindows()))
    stream = create_OutputStream()
    for kv in pairs:  # as a worker sends them over the data plane
        pre.get_impl().encode_to_stream(GlobalWindows.windowed_value(kv), stream, True)
    data = stream.get()
    tracemalloc.start()
    buffer = GroupingBuffer(pre, post, windowing)
    buffer.append(data)
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del buffer
    return held


def by_prefix(records: list) -> dict:
    """The records in groups, as augment groups them: by hash prefix."""
    groups = {}
    for r in records:
        groups.setdefault(r.sha256[:GROUP_PREFIX], []).append(r)
    return groups


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=20_000)
    n = parser.parse_args().records
    records = []
    for i in range(n):
        sha = hashlib.sha256(str(i).encode()).hexdigest()
        records.append(Checked(f"/data/images/automobile/{i:07d}.png", "automobile", sha, False, True))
    groups = by_prefix(records)
    # Two workers: each sends its own accumulator per group (a lifted combiner), a dict by hash.
    accumulators = [(prefix, {r.sha256: r for r in group})
                    for half in (records[:n // 2], records[n // 2:]) for prefix, group in by_prefix(half).items()]
    stamped = lambda v: (v, None)  # noqa: E731 - a Reshuffle carries (value, timestamp)
    print(f"{'shuffle':<36}{'per image':>10}{'grouped':>10}{'ratio':>8}   (bytes held per image, {n:,} images, "
          f"{len(groups)} groups)")
    for name, per_image, grouped in (
            ("dedupe (GroupByKey / combiner)", held_bytes([(r.sha256, r) for r in records], False),
             held_bytes(accumulators, False, coders.PickleCoder())),
            ("wait for the graph (Reshuffle)", held_bytes([(random.getrandbits(32), stamped(r)) for r in records], True),
             held_bytes([(random.getrandbits(32), stamped(g)) for g in groups.values()], True))):
        print(f"{name:<36}{per_image / n:>10.0f}{grouped / n:>10.0f}{per_image / grouped:>7.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
