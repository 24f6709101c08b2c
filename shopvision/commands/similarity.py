"""features, similar, audit: photo embeddings, similar catalogue photos, and a mislabelling audit."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import add_root_flag, add_step, positive_int

ORDER = 50


def _run_features(args: argparse.Namespace) -> None:
    from shopvision.components.data.manifest import parse_roots
    from shopvision.components.similarity.features import extract_features, summary

    from .evaluate import use_tracking_uri

    use_tracking_uri(args.tracking_uri, args.model)
    result = extract_features(
        args.model,
        args.data,
        args.out,
        batch_size=args.batch_size,
        device=args.device,
        roots=parse_roots(args.roots),
    )
    for u in result.unreadable:
        print(f"features: unreadable {u.path}: {u.reason} ({u.detail})", file=sys.stderr)
    print(summary(result))


def _run_similar(args: argparse.Namespace) -> None:
    from shopvision.components.errors import StepError
    from shopvision.components.similarity.similar import find_similar, format_similar, similar_summary

    result = find_similar(args.index, args.photos, k=args.k, batch_size=args.batch_size, device=args.device)
    if result.queries:
        print(format_similar(result, args.output))
    for u in result.unreadable:
        print(f"similar: {u.path}: not a usable photo: {u.reason} ({u.detail})", file=sys.stderr)
    print(similar_summary(result), file=sys.stderr)
    if result.unreadable:
        # The readable queries are answered above; the exit status still says that some were not.
        names = ", ".join(str(u.path) for u in result.unreadable[:3])
        more = f" and {len(result.unreadable) - 3} more" if len(result.unreadable) > 3 else ""
        raise StepError(f"{len(result.unreadable)} query file(s) could not be read as photos: {names}{more}")


def _run_audit(args: argparse.Namespace) -> None:
    from shopvision.components.similarity.audit import audit, summary

    print(summary(audit(args.index, args.out, k=args.k, min_share=args.min_share, device=args.device)))


def _share(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def add_parser(steps) -> None:
    features = add_step(
        steps,
        "features",
        "embed every catalogue photo (the layer before the classifier, L2-normalised) into an index folder",
        _run_features,
    )
    features.add_argument(
        "data",
        type=Path,
        help="DATA/<category>/<photo>, a split folder (all its splits), or a data step's output (every "
        "photo its manifest references)",
    )
    add_root_flag(features)
    features.add_argument(
        "--model",
        required=True,
        help="training output folder, model folder, checkpoint, runs:/RUN/model, models:/NAME@ALIAS",
    )
    features.add_argument(
        "--out",
        type=Path,
        required=True,
        help="index folder: embeddings.npy, index.csv, features.json and a copy of the model",
    )
    features.add_argument("--batch-size", type=positive_int, default=64)
    features.add_argument("--device", default="auto", help="auto (GPU when available), cpu or cuda")
    features.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)"
    )

    similar = add_step(
        steps,
        "similar",
        "the k most similar catalogue photos for each query photo (exact cosine search in an index)",
        _run_similar,
    )
    similar.add_argument("photos", nargs="+", type=Path, metavar="PHOTO", help="query photos or folders")
    similar.add_argument(
        "--index", type=Path, required=True, help="an index folder made by 'shopvision features'"
    )
    similar.add_argument("-k", type=positive_int, default=10, help="similar photos per query (default 10)")
    similar.add_argument(
        "--output",
        choices=["table", "csv", "json"],
        default="table",
        help="table (default), or csv / json on stdout for programs",
    )
    similar.add_argument("--batch-size", type=positive_int, default=64)
    similar.add_argument("--device", default="auto", help="auto (GPU when available), cpu or cuda")

    audit = add_step(
        steps,
        "audit",
        "likely mislabelled photos and categories that mix, from each photo's nearest neighbours; "
        "CSVs and a Markdown report with thumbnails",
        _run_audit,
    )
    audit.add_argument(
        "--index", type=Path, required=True, help="an index folder made by 'shopvision features'"
    )
    audit.add_argument("--out", type=Path, required=True, help="report folder")
    audit.add_argument(
        "-k", type=positive_int, default=10, help="neighbours per photo, other listings only (default 10)"
    )
    audit.add_argument(
        "--min-share",
        type=_share,
        default=0.6,
        help="flag a photo when at least this share of its neighbours is in one other category (default 0.6)",
    )
    audit.add_argument(
        "--device",
        default="auto",
        help="where the all-pairs search runs: auto (GPU when available), cpu or cuda",
    )
