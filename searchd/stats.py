"""``python -m searchd.stats``: reference statistics (``mu``, ``sigma``, ``n`` + metadata).

Sources (exactly one):

    --images DIR                      a folder of PNG/JPEG images (recursive, sorted)
    --array FILE.npz|FILE.npy         an array of images (uint8 0..255, or float in [-1, 1])
    --model NAME --exact              exact data samples of an embedded model
    --model NAME --solver S (--schedule FAMILY --nfe K | --sigmas 80,10,1,0)
                                      samples of any model under a given schedule

The file is written into ``--out-dir`` under the name of
``searchd.evaluation.reference.reference_name`` (source, feature network and mode, split,
resolution, count). Bad input prints one line and exits with status 2 before any expensive
work. Examples:

    python -m searchd.stats --model gmm-digits-k64 --exact --n 10000 --out-dir refs
    python -m searchd.stats --model gmm-digits-k64 --solver heun --schedule polynomial \\
        --nfe 127 --n 10000 --out-dir refs
    python -m searchd.stats --images data/cifar10-train --features inception --mode clean
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg"}
DEFAULT_REFERENCE_SEED_BASE = 2_000_000


class InputError(ValueError):
    """Bad command-line input: reported in one line, exit status 2."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Compute reference statistics (mu, sigma, n + metadata) of images in a "
        "feature space and write them to an .npz named after everything that shaped it.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1] if __doc__ else None,
    )
    src = p.add_argument_group("source (exactly one of --images, --array, --model)")
    src.add_argument("--images", type=Path, help="folder of PNG/JPEG images (recursive)")
    src.add_argument("--array", type=Path, help=".npy or .npz array of images")
    src.add_argument("--key", help="array name inside an .npz (default: its only array)")
    src.add_argument("--model", help="zoo model name (with --exact, or a schedule)")
    src.add_argument("--exact", action="store_true", help="exact data samples of --model")
    src.add_argument("--solver", default=None, help="ODE solver for schedule samples")
    src.add_argument("--schedule", default=None, help="baseline family (with --nfe or --steps)")
    src.add_argument("--nfe", type=int, default=None, help="NFE budget of the schedule")
    src.add_argument("--steps", type=int, default=None, help="steps of the schedule")
    src.add_argument("--rho", type=float, default=None, help="rho of the polynomial family")
    src.add_argument("--sigmas", default=None, help="explicit schedule, e.g. 80,10,1,0")
    src.add_argument(
        "--n",
        type=int,
        default=None,
        help="number of images (default: all, or 10000 for model sources)",
    )
    src.add_argument(
        "--seed-base",
        type=int,
        default=None,
        help=f"sample i uses seed seed_base + i (default {DEFAULT_REFERENCE_SEED_BASE}"
        " for --exact, 0 for schedules)",
    )

    feat = p.add_argument_group("feature space")
    feat.add_argument("--features", default="digits", help="digits, inception or pixels")
    feat.add_argument("--mode", default=None, help="inception: clean or legacy_tensorflow")
    feat.add_argument(
        "--inception-path",
        default=None,
        help="inception-2015-12-05.pt (file or folder; default clean-fid's cache)",
    )
    feat.add_argument(
        "--kid-features",
        type=int,
        default=5000,
        help="store this many per-sample features for KID (default 5000; 0: none)",
    )
    feat.add_argument(
        "--spatial",
        action="store_true",
        help="also store spatial statistics for sFID (inception, clean mode)",
    )

    out = p.add_argument_group("output")
    out.add_argument("--out-dir", type=Path, default=Path("."), help="folder of the .npz")
    out.add_argument("--split", default="all", help="split recorded in the name (default all)")
    out.add_argument("--source-name", default=None, help="override the source part of the name")
    out.add_argument("--batch-size", type=int, default=1000, help="images per batch")
    out.add_argument("--device", default="cpu")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


# Sources --------------------------------------------------------------------------------------
def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)


def _read_image(path: Path) -> np.ndarray:
    """One image file as uint8 [C, H, W] (grey stays 1 channel, others become RGB)."""
    from PIL import Image

    with Image.open(path) as im:
        if im.mode not in ("L", "RGB"):
            im = im.convert("L" if im.mode in ("1", "I", "I;16", "F") else "RGB")
        a = np.asarray(im)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def _uint8_to_unit(a: np.ndarray) -> Tensor:
    """uint8 levels -> float32 in [-1, 1] (inverted exactly by the features' quantization)."""
    return torch.from_numpy(a.astype(np.float32) / 127.5 - 1.0)


def _folder_batches(files: list[Path], batch: int, shape: tuple[int, ...]) -> Iterator[Tensor]:
    for a in range(0, len(files), batch):
        imgs = []
        for f in files[a : a + batch]:
            im = _read_image(f)
            if im.shape != shape:
                raise InputError(f"{f} has shape {im.shape}; the first image has {shape}")
            imgs.append(im)
        yield _uint8_to_unit(np.stack(imgs))


def _load_array(path: Path, key: str | None) -> np.ndarray:
    if path.suffix == ".npy":
        return np.load(path, mmap_mode="r")
    with np.load(path) as z:
        names = z.files
        if key is None:
            if len(names) != 1:
                raise InputError(f"{path} holds arrays {names}; choose one with --key")
            key = names[0]
        if key not in names:
            raise InputError(f"{path} has no array {key!r}; it holds {names}")
        return z[key]


def _as_nchw(a: np.ndarray) -> np.ndarray:
    """Images [N, H, W], [N, H, W, C] (C in 1, 3) or [N, C, H, W] as [N, C, H, W]."""
    if a.ndim == 3:
        return a[:, None]
    if a.ndim == 4 and a.shape[-1] in (1, 3) and a.shape[1] not in (1, 3):
        return a.transpose(0, 3, 1, 2)
    if a.ndim == 4 and a.shape[1] in (1, 3):
        return a
    raise InputError(
        f"array of shape {a.shape} is not images [N, H, W], [N, H, W, C] or [N, C, H, W]"
    )


def _array_batches(a: np.ndarray, batch: int) -> Iterator[Tensor]:
    for s in range(0, a.shape[0], batch):
        chunk = np.asarray(a[s : s + batch])
        if chunk.dtype == np.uint8:
            yield _uint8_to_unit(chunk)
        else:
            yield torch.from_numpy(chunk.astype(np.float32))


def _image_shape(shape: Sequence[int]) -> tuple[int, ...]:
    from searchd.evaluation.evaluate import _image_shape as shape_of

    return shape_of(tuple(int(s) for s in shape))


# Main -----------------------------------------------------------------------------------------
def _check_out_dir(out_dir: Path) -> None:
    """``--out-dir`` can be written: an existing writable folder, or one that can be made
    in a writable folder (checked before any work)."""
    import tempfile

    existing = out_dir
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise InputError(f"--out-dir {out_dir}: {existing} is a file, not a folder")
    try:  # the one sure test, whoever runs it: write a scratch file there
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".searchd-"):
            pass
    except OSError as e:
        raise InputError(f"--out-dir {out_dir}: {existing} is not writable "
                         f"(creating a file there: {e.strerror})") from None


def _plan(args: argparse.Namespace) -> dict[str, Any]:
    """Check the arguments (cheap checks only) and describe the job; ``InputError`` if bad."""
    from searchd.evaluation.features import FEATURES, INCEPTION_MODES

    sources = [s for s in ("images", "array", "model") if getattr(args, s) is not None]
    if len(sources) != 1:
        raise InputError("give exactly one source: --images DIR, --array FILE or --model NAME")
    if args.features not in FEATURES:
        raise InputError(
            f"unknown feature network {args.features!r}; known: {', '.join(sorted(FEATURES))}"
        )
    if args.features == "inception":
        args.mode = args.mode or "clean"
        if args.mode not in INCEPTION_MODES:
            raise InputError(f"unknown --mode {args.mode!r}; modes: {', '.join(INCEPTION_MODES)}")
    elif args.mode is not None:
        raise InputError(f"--mode applies to --features inception only (not {args.features})")
    if args.spatial and (args.features != "inception" or args.mode != "clean"):
        raise InputError("--spatial needs --features inception --mode clean")
    if args.n is not None and args.n < 2:
        raise InputError(f"--n {args.n}: reference statistics need at least 2 images")
    if args.batch_size < 1 or args.kid_features < 0:
        raise InputError("--batch-size must be >= 1 and --kid-features >= 0")
    if args.seed_base is not None and args.seed_base < 0:
        raise InputError(f"--seed-base {args.seed_base} must be >= 0")
    _check_out_dir(args.out_dir)
    model_only = [
        o
        for o in ("solver", "schedule", "nfe", "steps", "rho", "sigmas")
        if getattr(args, o) is not None
    ] + (["exact"] if args.exact else [])
    if sources[0] != "model" and model_only:
        raise InputError(f"--{model_only[0].replace('_', '-')} needs --model")
    plan: dict[str, Any] = {"kind": sources[0]}

    if args.images is not None:
        if not args.images.is_dir():
            raise InputError(f"--images {args.images}: no such folder")
        files = _image_files(args.images)
        if len(files) < 2:
            raise InputError(f"--images {args.images}: found {len(files)} PNG/JPEG files, need 2+")
        files = files[: args.n] if args.n else files
        shape = _read_image(files[0]).shape
        plan.update(files=files, shape=shape, n=len(files), source=args.images.resolve().name)
    elif args.array is not None:
        if not args.array.is_file() or args.array.suffix not in (".npy", ".npz"):
            raise InputError(f"--array {args.array}: no such .npy/.npz file")
        try:
            a = _as_nchw(_load_array(args.array, args.key))
        except (OSError, ValueError) as e:
            raise InputError(f"--array {args.array}: {str(e).splitlines()[0]}") from None
        a = a[: args.n] if args.n else a
        if a.shape[0] < 2:
            raise InputError(f"--array {args.array} holds {a.shape[0]} images; need 2+")
        plan.update(
            array=a,
            shape=a.shape[1:],
            n=a.shape[0],
            source=args.array.stem + (f"-{args.key}" if args.key else ""),
        )
    else:
        _plan_model(args, plan)
    return plan


def _plan_model(args: argparse.Namespace, plan: dict[str, Any]) -> None:
    from searchd.models import known_models
    from searchd.schedules.baselines import FAMILIES
    from searchd.solvers import SOLVERS

    if args.model not in known_models():
        raise InputError(f"unknown model {args.model!r}; known: {', '.join(known_models())}")
    plan["n"] = args.n or 10000
    if args.exact:
        extra = [
            o
            for o in ("solver", "schedule", "nfe", "steps", "sigmas")
            if getattr(args, o) is not None
        ]
        if extra:
            raise InputError(f"--exact takes no schedule (got --{extra[0]})")
        plan["seed_base"] = (
            DEFAULT_REFERENCE_SEED_BASE if args.seed_base is None else args.seed_base
        )
        plan["source"] = f"{args.model}-exact-seed{plan['seed_base']}"
        return
    plan["seed_base"] = 0 if args.seed_base is None else args.seed_base
    solver = args.solver or "dpmpp_2m"
    if solver not in SOLVERS:
        raise InputError(f"unknown solver {solver!r}; known: {', '.join(SOLVERS)}")
    plan["solver"] = solver
    if args.sigmas is not None:
        if args.schedule or args.nfe or args.steps or args.rho is not None:
            raise InputError("give --sigmas or --schedule with --nfe/--steps, not both")
        try:
            sig = [float(v) for v in args.sigmas.split(",")]
        except ValueError:
            raise InputError(f"--sigmas {args.sigmas!r} is not a comma-separated list") from None
        from searchd.schedule import validate_sigmas

        try:
            plan["sigmas"] = validate_sigmas(sig)
        except ValueError as e:
            raise InputError(f"--sigmas: {e}") from None
        plan["schedule_label"] = "sigmas"
    else:
        if args.schedule is None:
            raise InputError(
                "--model without --exact needs a schedule: --schedule FAMILY with "
                "--nfe or --steps, or --sigmas 80,10,1,0"
            )
        if args.schedule not in FAMILIES:
            raise InputError(
                f"unknown schedule family {args.schedule!r}; known: {', '.join(FAMILIES)}"
            )
        if (args.nfe is None) == (args.steps is None):
            raise InputError("give exactly one of --nfe and --steps with --schedule")
        if args.rho is not None and args.schedule != "polynomial":
            raise InputError("--rho applies to the polynomial family only")
        plan["schedule_label"] = args.schedule + (f"-rho{args.rho:g}" if args.rho else "")
    plan["source"] = None  # named once the schedule is resolved (it has an id)


def _resolve_schedule(args: argparse.Namespace, plan: dict[str, Any], den: Any) -> None:
    """Turn --schedule/--nfe or --sigmas into a Schedule checked against the model."""
    from searchd.schedule import Schedule
    from searchd.schedules.baselines import baseline
    from searchd.solvers import nfe

    solver = plan["solver"]
    if "sigmas" in plan:
        sched = Schedule(plan["sigmas"], solver=solver)
    else:
        steps = args.steps
        if steps is None:
            steps = 0
            while nfe(solver, steps + 1) <= args.nfe:
                steps += 1
            if steps == 0:
                raise InputError(f"--nfe {args.nfe} is too small for one step of {solver}")
        params = {} if args.rho is None else {"rho": args.rho}
        sig = baseline(args.schedule, steps, den.sigma_min, den.sigma_max, **params)
        sched = Schedule(sig, solver=solver)
    try:
        sched.check_range(den.sigma_min, den.sigma_max)
    except ValueError as e:
        raise InputError(f"schedule outside the model's range: {e}") from None
    spent = nfe(solver, sched.n_steps, final_zero=sched.final_zero)
    plan["schedule"] = sched
    plan["nfe"] = spent
    plan["source"] = (
        f"{args.model}-{solver}-{plan['schedule_label']}-nfe{spent}-{sched.id}"
        f"-seed{plan['seed_base']}"
    )


def _model_batches(args: argparse.Namespace, plan: dict[str, Any], den: Any) -> Iterator[Tensor]:
    """Exact samples, or samples under the schedule, of seeds seed_base .. seed_base + n - 1."""
    from searchd.noise import make_noise, seed_range
    from searchd.solvers import solve

    seeds = list(seed_range(plan["seed_base"], plan["n"]))
    shape = _image_shape(den.shape)
    dtype = getattr(den, "dtype", torch.float32)
    for a in range(0, len(seeds), args.batch_size):
        block = seeds[a : a + args.batch_size]
        if args.exact:
            x = den.sample_data(block)
        else:
            sched = plan["schedule"]
            noise = make_noise(block, tuple(den.shape), device=args.device, dtype=dtype)
            with torch.no_grad():
                x = solve(den, noise, torch.tensor(sched.sigmas), solver=sched.solver)
        if not torch.isfinite(x).all():
            raise ValueError(f"non-finite samples among seeds {block[0]}..{block[-1]}")
        yield x.reshape(x.shape[0], *shape).to(torch.float32)


def run(args: argparse.Namespace) -> Path:
    """Compute and write the statistics; returns the file written."""
    from tqdm import tqdm

    from searchd.evaluation.features import load_features
    from searchd.evaluation.reference import compute_reference, reference_name

    plan = _plan(args)
    opts: dict[str, Any] = {"device": args.device}
    if args.features == "inception":
        opts.update(mode=args.mode, path=args.inception_path)
    den = None
    if plan["kind"] == "model":
        from searchd.models import load

        den = load(args.model, device=args.device)
        if args.exact and not hasattr(den, "sample_data"):
            raise InputError(f"model {args.model!r} has no exact samples; give a schedule")
        image_shape = _image_shape(den.shape)
    else:
        image_shape = tuple(int(s) for s in plan["shape"])
    if args.features == "pixels":
        opts["shape"] = image_shape
    try:
        net = load_features(args.features, **opts)
    except (FileNotFoundError, ValueError) as e:
        raise InputError(str(e)) from None
    if args.features == "digits" and image_shape != (1, 8, 8):
        raise InputError(f"digits features take 1x8x8 images; the source has {image_shape}")

    if plan["kind"] == "model" and not args.exact:
        _resolve_schedule(args, plan, den)
    if plan["kind"] == "images":
        batches = _folder_batches(plan["files"], args.batch_size, tuple(plan["shape"]))
    elif plan["kind"] == "array":
        batches = _array_batches(plan["array"], args.batch_size)
    else:
        batches = _model_batches(args, plan, den)

    source = args.source_name or plan["source"]
    meta: dict[str, Any] = {"source": source, "split": args.split}
    if plan["kind"] == "model":
        meta.update(model=args.model, seed_base=plan["seed_base"], exact=bool(args.exact))
        if not args.exact:
            meta.update(solver=plan["solver"], nfe=plan["nfe"], schedule=plan["schedule"].to_dict())
    bar = tqdm(total=plan["n"], unit="img", desc="stats", disable=args.no_progress, file=sys.stderr)
    with bar:
        ref = compute_reference(
            batches, net, meta, keep_features=args.kid_features, spatial=args.spatial, progress=bar
        )
    name = reference_name(
        source=source,
        features=net.name,
        mode=net.mode,
        split=args.split,
        resolution=image_shape,
        count=ref.meta["count"],
    )
    return ref.save(args.out_dir / name)


PROG = "python -m searchd.stats"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; exit status 0, 2 for bad input, 1 for a failure (one line on stderr:
    ``python -m searchd.stats: error: ...``)."""
    from searchd import cli

    args = _parser().parse_args(argv)

    def body() -> int:
        print(f"wrote {run(args)}")
        return 0

    return cli.run_command(PROG, body, bad=(InputError,))


if __name__ == "__main__":
    sys.exit(main())
