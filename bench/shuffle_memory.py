"""What Beam's local runner holds per record in a shuffle, for augment's small per-image record.

    python bench/shuffle_memory.py [--records 20000]

The local runner (FnApiRunner, the DirectRunner's engine) keeps every GroupByKey's and Reshuffle's
input in its own process until the next stage reads it, each value decoded into a Python object
(GroupingBuffer). augment shuffles one small record per image (the dedupe, then each split's wait
for the transform graph), so these bytes times the image count is how the runner's memory grows
with the input. Measured with tracemalloc on Beam's own GroupingBuffer, for the record as a dict
(the plain way, and augment's before) and as augment's `Checked` named tuple; prints the ratio.
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

from kflift.components.augment import Checked


def held_bytes_per_record(pairs: list, reshuffle: bool) -> float:
    """Bytes the runner's buffer holds per (key, value) pair, as a GroupByKey (the dedupe) or a
    Reshuffle (which reifies each value's timestamp under a trigger: non-default windowing)."""
    any_coder = coders.FastPrimitivesCoder()
    pre = coders.WindowedValueCoder(coders.TupleCoder([any_coder, any_coder]), coders.coders.GlobalWindowCoder())
    post = coders.WindowedValueCoder(coders.TupleCoder([any_coder, coders.IterableCoder(any_coder)]),
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
    return held / len(pairs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=20_000)
    n = parser.parse_args().records
    records = []
    for i in range(n):
        sha = hashlib.sha256(str(i).encode()).hexdigest()
        records.append(Checked(f"/data/images/automobile/{i:07d}.png", "automobile", sha, False, True))
    print(f"{'shuffle':<36}{'dict':>10}{'Checked':>10}{'ratio':>8}   (bytes held per record, {n:,} records)")
    # The plain record: the same fields in a dict (the dedupe's has no duplicate count yet).
    for name, reshuffle, key, as_dict in (
            ("dedupe (GroupByKey on the hash)", False, lambda r: r.sha256,
             lambda r: {k: v for k, v in r._asdict().items() if k != "duplicates"}),
            ("wait for the graph (Reshuffle)", True, lambda r: random.getrandbits(32), lambda r: r._asdict())):
        wrap = (lambda v: (v, None)) if reshuffle else (lambda v: v)  # Reshuffle carries (value, timestamp)
        plain = held_bytes_per_record([(key(r), wrap(as_dict(r))) for r in records], reshuffle)
        tuple_ = held_bytes_per_record([(key(r), wrap(r)) for r in records], reshuffle)
        print(f"{name:<36}{plain:>10.0f}{tuple_:>10.0f}{plain / tuple_:>7.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
