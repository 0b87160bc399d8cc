"""Export scikit-learn's bundled iris and digits into ``src/infl/data_files/``.

Run once (needs scikit-learn); the generated files are committed so that ``infl.studies.datasets``
needs no scikit-learn at run time::

    python scripts/export_datasets.py

Output (byte-for-byte reproducible: gzip is written with ``mtime=0``):

* ``iris.csv`` — 150 rows, header ``sepal_length_cm,sepal_width_cm,petal_length_cm,
  petal_width_cm,label``; four measurements in cm (one decimal) and the class 0/1/2
  (setosa/versicolor/virginica).
* ``digits.csv.gz`` — 1,797 rows, header ``p00,...,p63,label``; 64 pixel counts 0..16 of the
  8x8 image in row-major order, and the digit 0..9.

Both are the UCI ML repository data sets as redistributed by scikit-learn (CC BY 4.0).
"""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits, load_iris

OUT = Path(__file__).resolve().parents[1] / "src" / "infl" / "data_files"


def export_iris(path: Path) -> None:
    """Write iris as a plain CSV with an integer label column."""
    iris = load_iris()
    header = "sepal_length_cm,sepal_width_cm,petal_length_cm,petal_width_cm,label"
    lines = [header]
    for row, label in zip(iris.data, iris.target, strict=True):
        lines.append(",".join(f"{v:.1f}" for v in row) + f",{int(label)}")
    path.write_text("\n".join(lines) + "\n", encoding="ascii")


def export_digits(path: Path) -> None:
    """Write digits as a gzipped CSV of integers (pixels 0..16, then the label)."""
    digits = load_digits()
    data = digits.data.astype(np.int64)
    if data.min() < 0 or data.max() > 16 or not np.array_equal(data, digits.data):
        raise SystemExit("unexpected digits pixel values; expected integers 0..16")
    buf = io.StringIO()
    buf.write(",".join([f"p{i:02d}" for i in range(64)] + ["label"]) + "\n")
    for row, label in zip(data, digits.target, strict=True):
        buf.write(",".join(str(int(v)) for v in row) + f",{int(label)}\n")
    with (
        open(path, "wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz,
    ):
        gz.write(buf.getvalue().encode("ascii"))


def main() -> None:
    """Export both files and print their sizes."""
    OUT.mkdir(parents=True, exist_ok=True)
    export_iris(OUT / "iris.csv")
    export_digits(OUT / "digits.csv.gz")
    for name in ("iris.csv", "digits.csv.gz"):
        print(f"{OUT / name}: {(OUT / name).stat().st_size} bytes")


if __name__ == "__main__":
    main()
