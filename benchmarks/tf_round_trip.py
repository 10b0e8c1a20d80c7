"""What a ``tf.numpy_function`` under ``tf.function`` costs around a body that runs for a
given time, and on which side of the body the time goes (docs/performance.md, "The
TensorFlow round trip").

    python benchmarks/tf_round_trip.py [--calls 40] [--work sleep|spin]

The body sleeps (or spins in Python) for 0 to 20 ms; each line gives the median time of the
TensorFlow call, of the body called directly, their difference, and the time from the call
to the body's start and from the body's end to the call's return.
"""
import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main():
    import numpy as np
    import tensorflow as tf

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=40)
    ap.add_argument("--work", choices=["sleep", "spin"], default="sleep")
    args = ap.parse_args()
    x = tf.constant(np.zeros(4, np.float32))
    marks = {}
    print(f"body ({args.work})   tf.function   direct   overhead   before body   after body")
    for ms in [0, 0.2, 0.5, 1, 2, 5, 10, 20]:
        def body(a, seconds=ms / 1e3):
            marks["start"] = time.perf_counter()
            if args.work == "sleep" and seconds:
                time.sleep(seconds)
            elif seconds:
                while time.perf_counter() - marks["start"] < seconds:
                    pass
            marks["end"] = time.perf_counter()
            return a

        f = tf.function(lambda a: tf.numpy_function(body, [a], tf.float32, stateful=True))
        f(x)
        f(x)
        tf_t, direct, before, after = [], [], [], []
        for _ in range(args.calls):     # interleaved: the machine's drift hits both alike
            t0 = time.perf_counter()
            f(x)
            t1 = time.perf_counter()
            tf_t.append(t1 - t0)
            before.append(marks["start"] - t0)
            after.append(t1 - marks["end"])
            t0 = time.perf_counter()
            body(None)
            direct.append(time.perf_counter() - t0)
        med = [float(np.median(v)) * 1e3 for v in (tf_t, direct, before, after)]
        print(f"{ms:6.1f} ms      {med[0]:8.3f}  {med[1]:8.3f}   {med[0] - med[1]:7.3f}"
              f"     {med[2]:8.3f}     {med[3]:8.3f}")


if __name__ == "__main__":
    main()
