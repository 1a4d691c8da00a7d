"""Write the example tables from scikit-learn's bundled (offline) data sets.

The CSVs are committed; run this to regenerate them byte for byte:
``python examples/make_data.py``.
"""

from __future__ import annotations

from pathlib import Path

from sklearn.datasets import load_breast_cancer, load_diabetes

HERE = Path(__file__).parent


def main() -> None:
    # scaled=False keeps the raw clinical units so standardisation is our job.
    diabetes = load_diabetes(as_frame=True, scaled=False).frame
    diabetes.to_csv(HERE / "regression" / "diabetes.csv", index=False, float_format="%.6g")
    cancer = load_breast_cancer(as_frame=True).frame
    cancer.columns = [c.replace(" ", "_") for c in cancer.columns]
    cancer.to_csv(HERE / "classification" / "breast_cancer.csv", index=False, float_format="%.6g")


if __name__ == "__main__":
    main()
