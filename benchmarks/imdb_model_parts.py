"""Where the time of an IMDB-style ``train_on_batch`` goes: the same model without a
recurrent layer (Embedding -> GlobalAveragePooling1D -> Dense), and with the fastcells and
the built-in LSTM and GRU, all timed in alternation (docs/performance.md, "model.fit: the
rest of the model").

    python benchmarks/imdb_model_parts.py [--batches 15] [--seconds 1.5]

Each line gives the median and the fastest ms per batch, and how many batches were timed.
The model without a recurrent layer is what every model pays on top of its layer's
training step.
"""
import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main():
    import numpy as np
    import keras

    import fastcells
    from fastcells.bench import timing, workloads

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, default=15, help="timed batches per model, at least")
    ap.add_argument("--seconds", type=float, default=1.5, help="time per model, at least")
    args = ap.parse_args()
    x, y = workloads.imdb_batch()

    def model(middle):
        m = keras.Sequential([keras.Input((x.shape[1],), dtype="int32"),
                              keras.layers.Embedding(10000, 32), middle,
                              keras.layers.Dense(1, activation="sigmoid")])
        m.compile(optimizer="adam", loss="binary_crossentropy")
        return m

    models = {"no recurrent layer": model(keras.layers.GlobalAveragePooling1D()),
              "fastcells LSTM": model(fastcells.LSTM(32)),
              "keras LSTM": model(keras.layers.LSTM(32)),
              "fastcells GRU": model(fastcells.GRU(32)),
              "keras GRU": model(keras.layers.GRU(32))}
    timers = [timing.timed(lambda m=m: m.train_on_batch(x, y))
              for m in models.values()]
    times = timing.time_interleaved(timers, repeats=args.batches, warmup=3,
                                    min_seconds=args.seconds)
    print(f"IMDB-style model, B={x.shape[0]} T={x.shape[1]}: ms per train_on_batch")
    for name, t in zip(models, times):
        print(f"  {name:20s} median {np.median(t) * 1e3:6.1f}   fastest {min(t) * 1e3:6.1f}"
              f"   n {len(t)}")


if __name__ == "__main__":
    main()
