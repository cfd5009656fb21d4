"""Writers of tiny dataset files in the real on-disk formats (CIFAR pickles, SVHN .mat, idx), for the tests."""
import gzip
import pickle
import struct

import numpy as np

RNG = np.random.default_rng(0)


def random_images(n, c=3, h=32, w=32):
    return RNG.integers(0, 256, size=(n, c, h, w), dtype=np.uint8)


# ---------------------------------------------------------------- writers of the real on-disk formats

def write_pickle(path, obj, protocol=2, legacy_numpy=False):
    """Pickle obj; legacy_numpy (protocol 2 only) names numpy's module as numpy 1.x and the original archive do."""
    raw = pickle.dumps(obj, protocol=protocol)
    if legacy_numpy:
        raw = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    path.write_bytes(raw)


def write_cifar10(root, per_batch=6, n_test=9):
    """cifar-10-batches-py as in the python archive; returns {split: (images (N,3,32,32), labels)}."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    out = {"train": ([], [])}
    for i in range(1, 6):
        im, lab = random_images(per_batch), RNG.integers(0, 10, per_batch)
        write_pickle(folder / f"data_batch_{i}",
                     {b"batch_label": f"training batch {i} of 5".encode(), b"labels": [int(v) for v in lab],
                      b"data": im.reshape(per_batch, 3072), b"filenames": [b"x.png"] * per_batch},
                     protocol=(2, 4, 5)[i % 3], legacy_numpy=i == 3)
        out["train"][0].append(im)
        out["train"][1].append(lab)
    out["train"] = tuple(np.concatenate(a) for a in out["train"])
    im, lab = random_images(n_test), RNG.integers(0, 10, n_test)
    write_pickle(folder / "test_batch", {b"batch_label": b"testing batch 1 of 1", b"labels": [int(v) for v in lab],
                                         b"data": im.reshape(n_test, 3072), b"filenames": [b"y.png"] * n_test})
    out["test"] = (im, lab)
    write_pickle(folder / "batches.meta", {b"num_cases_per_batch": per_batch, b"num_vis": 3072,
                                           b"label_names": [b"airplane"] * 10})
    return out


def write_cifar100(root, n_train=11, n_test=5):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        im, fine = random_images(n), RNG.integers(0, 100, n)
        write_pickle(folder / split, {b"filenames": [b"z.png"] * n, b"batch_label": split.encode(),
                                      b"fine_labels": [int(v) for v in fine],
                                      b"coarse_labels": [int(v) // 5 for v in fine], b"data": im.reshape(n, 3072)})
        out[split] = (im, fine)
    write_pickle(folder / "meta", {b"fine_label_names": [b"apple"] * 100, b"coarse_label_names": [b"fish"] * 20})
    return out


def write_svhn(root, n=13, split="test"):
    """<split>_32x32.mat: X (32, 32, 3, N) as (row, col, channel, image), y (N, 1) with 10 for digit 0."""
    import scipy.io

    im, digits = random_images(n), np.arange(n) % 10
    root.mkdir(parents=True, exist_ok=True)
    y = np.where(digits == 0, 10, digits).astype(np.uint8)[:, None]
    scipy.io.savemat(str(root / f"{split}_32x32.mat"), {"X": im.transpose(2, 3, 1, 0), "y": y})
    return im, digits


def idx_bytes(array):
    array = np.ascontiguousarray(array, dtype=np.uint8)
    return struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_fashion(folder, compressed, n_train=12, n_test=7):
    """{train,t10k}-{images-idx3,labels-idx1}-ubyte, optionally .gz; returns {split: (images (N,28,28), labels)}."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        im, lab = random_images(n, 1, 28, 28)[:, 0], RNG.integers(0, 10, n).astype(np.uint8)
        for stem, arr in ((f"{prefix}-images-idx3-ubyte", im), (f"{prefix}-labels-idx1-ubyte", lab)):
            raw = idx_bytes(arr)
            if compressed:
                (folder / f"{stem}.gz").write_bytes(gzip.compress(raw))
            else:
                (folder / stem).write_bytes(raw)
        out[split] = (im, lab)
    return out
