"""StyleGAN2-ADA training (Karras et al. 2020) of our class-conditional face generator.

The recipe of NVIDIA's stylegan2-ada-pytorch, phase by phase: non-saturating logistic loss,
lazy R1 on the reals every 16 minibatches, lazy path-length regularisation every 4, style
mixing, an EMA of G with ramp-up, ADA, Adam(0.0025, betas (0, 0.99)) with the lazy-regularisation
correction of lr and betas. The label is gender x age group (``dataset.class_index``), one-hot.

On CUDA the whole packed training set sits in GPU memory (64 px: ~0.3 GB, 128 px: ~1.1 GB), so
batches are indexed on the device with no loader at all, and the main phases run under bf16
autocast; the regularisers (second-order gradients) stay in float32. Nothing calls ``.item()``
between log ticks.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from pipeline.generate.augment import AugmentPipe, ada_adjust
from pipeline.generate.checkpoint import save_ship_file
from pipeline.generate.dataset import NUM_CLASSES, PackedFaces, load_packed
from pipeline.generate.discriminator import Discriminator
from pipeline.generate.stylegan2 import Generator, to_uint8_images

__all__ = ["PRESETS", "TrainConfig", "Trainer", "add_arguments", "run_from_args"]

W_AVG_BETA = 0.995  # the mapping network's running mean of w (truncation centre), as official
PL_DECAY = 0.01
PL_BATCH_SHRINK = 2
GRID_COLUMNS = 8


@dataclass(frozen=True)
class TrainConfig:
    resolution: int
    batch: int
    channel_base: int
    channel_max: int
    r1_gamma: float
    ema_kimg: float
    z_dim: int = 512
    w_dim: int = 512
    map_layers: int = 2
    mbstd_group: int = 4
    conv_clamp: float | None = 256
    lr: float = 0.0025
    r1_interval: int = 16
    pl_weight: float = 2.0
    pl_interval: int = 4
    style_mixing: float = 0.9
    ema_rampup: float | None = 0.05
    augment: bool = True
    ada_target: float = 0.6
    ada_interval: int = 4
    ada_kimg: float = 500
    mirror: bool = True  # x-flipped reals: faces are left-right symmetric in distribution
    kimg_per_tick: float = 4


def _auto_gamma(resolution: int, batch: int) -> float:
    """The official 'auto' config's heuristic: gamma = 0.0002 * R^2 / batch."""
    return 0.0002 * resolution ** 2 / batch


PRESETS: dict[str, TrainConfig] = {
    # CPU CI: seconds per handful of steps; ema and ADA sped up so a few steps show their effect.
    "tiny": TrainConfig(resolution=16, batch=8, channel_base=512, channel_max=32, r1_gamma=0.01, ema_kimg=0.05,
                        z_dim=32, w_dim=32, ema_rampup=None, ada_kimg=1, kimg_per_tick=0.016),
    # One H100 for ~30 minutes: the official 'auto' settings with channels capped at 256.
    "64": TrainConfig(resolution=64, batch=64, channel_base=16384, channel_max=256,
                      r1_gamma=_auto_gamma(64, 64), ema_kimg=64 * 10 / 32),
    "128": TrainConfig(resolution=128, batch=64, channel_base=16384, channel_max=256,
                       r1_gamma=_auto_gamma(128, 64), ema_kimg=64 * 10 / 32),
}


def network_kwargs(cfg: TrainConfig) -> dict[str, dict[str, Any]]:
    """Constructor arguments of G and D (stored in every checkpoint)."""
    return {
        "G": {"z_dim": cfg.z_dim, "c_dim": NUM_CLASSES, "w_dim": cfg.w_dim, "img_resolution": cfg.resolution,
              "img_channels": 3, "mapping_kwargs": {"num_layers": cfg.map_layers},
              "synthesis_kwargs": {"channel_base": cfg.channel_base, "channel_max": cfg.channel_max,
                                   "conv_clamp": cfg.conv_clamp}},
        "D": {"c_dim": NUM_CLASSES, "img_resolution": cfg.resolution, "img_channels": 3,
              "channel_base": cfg.channel_base, "channel_max": cfg.channel_max, "conv_clamp": cfg.conv_clamp,
              "epilogue_kwargs": {"mbstd_group_size": cfg.mbstd_group}},
    }


def _adam(params: Iterator[torch.nn.Parameter], lr: float, reg_interval: int | None) -> torch.optim.Adam:
    """Adam(0, 0.99) with lazy regularisation's correction: the extra optimizer step every
    ``reg_interval`` minibatches would otherwise raise the effective lr and shorten the momentum."""
    ratio = reg_interval / (reg_interval + 1) if reg_interval else 1.0
    return torch.optim.Adam(params, lr=lr * ratio, betas=(0.0, 0.99 ** ratio), eps=1e-8)


def _sanitize_grads(module: torch.nn.Module) -> None:
    """As official: one bad batch must not write NaN/inf into the weights."""
    for p in module.parameters():
        if p.grad is not None:
            torch.nan_to_num_(p.grad, nan=0.0, posinf=1e5, neginf=-1e5)


class Trainer:
    """The networks, optimizers, ADA state and counters of one run; ``step`` is one minibatch."""

    def __init__(self, cfg: TrainConfig, data: PackedFaces, outdir: Path, device: torch.device, seed: int = 0,
                 amp: bool = True, channels_last: bool = False) -> None:
        if data.resolution != cfg.resolution:
            raise ValueError(f"the data is {data.resolution} px, the config {cfg.resolution} px")
        if cfg.batch % cfg.mbstd_group:
            raise ValueError(f"batch {cfg.batch} must be a multiple of the mbstd group {cfg.mbstd_group}")
        train = ~data.held_out
        if not train.any():
            raise ValueError("no training faces (all are held out)")
        self.cfg = cfg
        self.outdir = outdir
        self.device = device
        self.amp = amp and device.type == "cuda"
        self.channels_last = channels_last
        torch.manual_seed(seed)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.images = torch.from_numpy(data.images[train]).permute(0, 3, 1, 2).contiguous().to(device)
        self.labels = torch.from_numpy(data.labels[train]).to(device)

        self.init_kwargs = network_kwargs(cfg)
        self.G = Generator(**self.init_kwargs["G"]).to(device).train().requires_grad_(False)
        self.D = Discriminator(**self.init_kwargs["D"]).to(device).train().requires_grad_(False)
        if channels_last:
            self.D = self.D.to(memory_format=torch.channels_last)
        self.G_ema = copy.deepcopy(self.G).eval()
        self.augment_pipe = AugmentPipe(0.0).to(device) if cfg.augment else None
        self.G_opt = _adam(self.G.parameters(), cfg.lr, cfg.pl_interval if cfg.pl_weight > 0 else None)
        self.D_opt = _adam(self.D.parameters(), cfg.lr, cfg.r1_interval if cfg.r1_gamma > 0 else None)
        self.pl_mean = torch.zeros([], device=device)
        self.ada_sum = torch.zeros([], device=device)
        self.ada_count = 0
        self.cur_nimg = 0
        self.iteration = 0
        self._stats: dict[str, list[Tensor]] = {}
        grid_z = torch.randn([GRID_COLUMNS, cfg.z_dim], generator=torch.Generator().manual_seed(seed))
        self.grid_z = grid_z.repeat(NUM_CLASSES, 1).to(device)
        grid_labels = torch.arange(NUM_CLASSES).repeat_interleave(GRID_COLUMNS)
        self.grid_c = F.one_hot(grid_labels, NUM_CLASSES).float().to(device)

    # --- one minibatch of each phase -------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.amp else contextlib.nullcontext()

    def _record(self, name: str, value: Tensor) -> None:
        self._stats.setdefault(name, []).append(value.detach().float().mean())

    def _gen_c(self, n: int) -> Tensor:
        """Labels drawn from the training set's distribution, as official."""
        idx = torch.randint(len(self.labels), [n], device=self.device)
        return F.one_hot(self.labels[idx], NUM_CLASSES).float()

    def _real_batch(self) -> tuple[Tensor, Tensor]:
        idx = torch.randint(len(self.images), [self.cfg.batch], device=self.device)
        img = self.images[idx].float() / 127.5 - 1
        if self.cfg.mirror:
            flip = torch.rand([img.shape[0], 1, 1, 1], device=self.device) < 0.5
            img = torch.where(flip, img.flip(3), img)
        return img, F.one_hot(self.labels[idx], NUM_CLASSES).float()

    def _run_G(self, z: Tensor, c: Tensor, update_w_avg: bool = False) -> tuple[Tensor, Tensor]:
        ws = self.G.mapping(z, c)
        if update_w_avg:
            w_avg = self.G.mapping.w_avg
            w_avg.copy_(ws[:, 0].detach().float().mean(dim=0).lerp(w_avg, W_AVG_BETA))
        if self.cfg.style_mixing > 0:
            # A random crossover layer for the whole batch, chosen on the device (no sync).
            cutoff = torch.randint(1, ws.shape[1], [], device=ws.device)
            cutoff = torch.where(torch.rand([], device=ws.device) < self.cfg.style_mixing, cutoff,
                                 torch.full_like(cutoff, ws.shape[1]))
            mixed = self.G.mapping(torch.randn_like(z), c)
            later = (torch.arange(ws.shape[1], device=ws.device) >= cutoff)[None, :, None]
            ws = torch.where(later, mixed, ws)
        return self.G.synthesis(ws), ws

    def _run_D(self, img: Tensor, c: Tensor) -> Tensor:
        if self.augment_pipe is not None:
            img = self.augment_pipe(img)
        if self.channels_last:
            img = img.contiguous(memory_format=torch.channels_last)
        return self.D(img, c)

    def _opt_step(self, opt: torch.optim.Optimizer, module: torch.nn.Module, loss: Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        _sanitize_grads(module)
        opt.step()

    def step(self) -> None:
        """One minibatch of each phase: Gmain, Greg (lazy), Dmain, Dreg (lazy); then EMA and ADA."""
        cfg, batch, dev = self.cfg, self.cfg.batch, self.device
        real, real_c = self._real_batch()

        self.G.requires_grad_(True)
        c = self._gen_c(batch)
        with self._autocast():
            fake, _ = self._run_G(torch.randn([batch, cfg.z_dim], device=dev), c, update_w_avg=True)
            loss_G = F.softplus(-self._run_D(fake, c).float()).mean()
        self._opt_step(self.G_opt, self.G, loss_G)
        self._record("loss_G", loss_G)

        if cfg.pl_weight > 0 and self.iteration % cfg.pl_interval == 0:
            n = max(batch // PL_BATCH_SHRINK, 1)
            fake, ws = self._run_G(torch.randn([n, cfg.z_dim], device=dev), self._gen_c(n))
            noise = torch.randn_like(fake) / math.sqrt(fake.shape[2] * fake.shape[3])
            (grads,) = torch.autograd.grad((fake * noise).sum(), ws, create_graph=True)
            lengths = grads.square().sum(2).mean(1).sqrt()
            pl_mean = self.pl_mean.lerp(lengths.mean(), PL_DECAY)
            self.pl_mean.copy_(pl_mean.detach())
            penalty = (lengths - pl_mean).square().mean()
            self._opt_step(self.G_opt, self.G, penalty * cfg.pl_weight * cfg.pl_interval)
            self._record("pl", penalty)
        self.G.requires_grad_(False)

        self.D.requires_grad_(True)
        c = self._gen_c(batch)
        with self._autocast():
            with torch.no_grad():
                fake, _ = self._run_G(torch.randn([batch, cfg.z_dim], device=dev), c)
            fake_logits = self._run_D(fake, c).float()
            real_logits = self._run_D(real, real_c).float()
            loss_D = F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()
        self._opt_step(self.D_opt, self.D, loss_D)
        self._record("loss_D", loss_D)
        self._record("rt", real_logits.sign())
        self.ada_sum += real_logits.detach().sign().sum()
        self.ada_count += batch

        if cfg.r1_gamma > 0 and self.iteration % cfg.r1_interval == 0:
            # The gradient is taken at the un-augmented reals, through the augmentation.
            real_in = real.detach().requires_grad_(True)
            (grads,) = torch.autograd.grad(self._run_D(real_in, real_c).sum(), real_in, create_graph=True)
            r1 = grads.square().sum([1, 2, 3]).mean()
            self._opt_step(self.D_opt, self.D, r1 * (cfg.r1_gamma / 2) * cfg.r1_interval)
            self._record("r1", r1)
        self.D.requires_grad_(False)

        self._update_ema()
        self.cur_nimg += batch
        self.iteration += 1
        if self.augment_pipe is not None and self.iteration % cfg.ada_interval == 0:
            pipe = self.augment_pipe
            pipe.p.copy_(ada_adjust(pipe.p, self.ada_sum / self.ada_count, cfg.ada_target, batch,
                                    cfg.ada_interval, cfg.ada_kimg))
            self.ada_sum.zero_()
            self.ada_count = 0

    @torch.no_grad()
    def _update_ema(self) -> None:
        ema_nimg = self.cfg.ema_kimg * 1000
        if self.cfg.ema_rampup is not None:
            ema_nimg = min(ema_nimg, self.cur_nimg * self.cfg.ema_rampup)
        beta = 0.5 ** (self.cfg.batch / max(ema_nimg, 1e-8))
        torch._foreach_lerp_(list(self.G_ema.parameters()), list(self.G.parameters()), 1 - beta)
        for b_ema, b in zip(self.G_ema.buffers(), self.G.buffers()):
            b_ema.copy_(b)

    # --- checkpoints ---------------------------------------------------------------------
    @property
    def augment_p(self) -> float:
        return float(self.augment_pipe.p) if self.augment_pipe is not None else 0.0

    def state(self) -> dict[str, Any]:
        rng: dict[str, Any] = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {"G": self.G.state_dict(), "G_ema": self.G_ema.state_dict(), "D": self.D.state_dict(),
                "G_opt": self.G_opt.state_dict(), "D_opt": self.D_opt.state_dict(), "augment_p": self.augment_p,
                "kimg": self.cur_nimg / 1000, "cur_nimg": self.cur_nimg, "iteration": self.iteration,
                "pl_mean": float(self.pl_mean), "ada_sum": float(self.ada_sum), "ada_count": self.ada_count,
                "init_kwargs": self.init_kwargs, "config": asdict(self.cfg), "rng": rng}

    def load_state(self, state: dict[str, Any]) -> None:
        self.G.load_state_dict(state["G"])
        self.G_ema.load_state_dict(state["G_ema"])
        self.D.load_state_dict(state["D"])
        self.G_opt.load_state_dict(state["G_opt"])
        self.D_opt.load_state_dict(state["D_opt"])
        if self.augment_pipe is not None:
            self.augment_pipe.p.fill_(state["augment_p"])
        self.cur_nimg = int(state["cur_nimg"])
        self.iteration = int(state["iteration"])
        self.pl_mean.fill_(state["pl_mean"])
        self.ada_sum.fill_(state["ada_sum"])
        self.ada_count = int(state["ada_count"])
        torch.set_rng_state(state["rng"]["torch"])
        if self.device.type == "cuda" and "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)

    @classmethod
    def resume(cls, path: Path, data: PackedFaces, outdir: Path, device: torch.device, amp: bool = True,
               channels_last: bool = False) -> Trainer:
        # On the CPU first: RNG states must stay CPU tensors; load_state_dict moves the rest.
        state = torch.load(path, map_location="cpu", weights_only=True)
        trainer = cls(TrainConfig(**state["config"]), data, outdir, device, amp=amp, channels_last=channels_last)
        trainer.load_state(state)
        return trainer

    def save_snapshot(self) -> Path:
        """network-snapshot-KKKKKK.pt (everything to resume), G_ema-KKKKKK.fp16.pt (to ship), a grid PNG."""
        self.outdir.mkdir(parents=True, exist_ok=True)
        tag = f"{self.cur_nimg // 1000:06d}"
        path = self.outdir / f"network-snapshot-{tag}.pt"
        torch.save(self.state(), path)
        save_ship_file(self.G_ema, {"G": self.init_kwargs["G"]}, self.outdir / f"G_ema-{tag}.fp16.pt",
                       {"kimg": self.cur_nimg / 1000, "classes": "gender * 4 + age group (0-9, 10-29, 30-59, 60+)"})
        self.sample_grid().save(self.outdir / f"fakes-{tag}.png")
        return path

    @torch.no_grad()
    def sample_grid(self) -> Image.Image:
        """Rows are the 8 classes (male 0-9 ... female 60+), columns fixed latents."""
        images = to_uint8_images(self.G_ema(self.grid_z, self.grid_c, noise_mode="const").float().cpu().numpy())
        r = self.cfg.resolution
        grid = images.reshape(NUM_CLASSES, GRID_COLUMNS, r, r, 3).transpose(0, 2, 1, 3, 4)
        return Image.fromarray(grid.reshape(NUM_CLASSES * r, GRID_COLUMNS * r, 3))

    # --- the loop ------------------------------------------------------------------------
    def _flush_stats(self) -> dict[str, float]:
        stats = {k: round(float(torch.stack(v).mean()), 4) for k, v in self._stats.items()}
        self._stats = {}
        return stats

    def train(self, max_kimg: float, minutes: float | None = None, snap_kimg: float | None = None,
              log: Callable[[str], None] = print) -> Path:
        """Run until ``max_kimg`` or ``minutes``; log a JSON line per tick; return the last snapshot."""
        start = tick_start = time.time()
        tick_nimg = self.cur_nimg
        snap_nimg = snap_kimg * 1000 if snap_kimg else math.inf
        next_snap = (self.cur_nimg // snap_nimg + 1) * snap_nimg
        deadline = start + minutes * 60 if minutes is not None else math.inf
        while self.cur_nimg < max_kimg * 1000 and time.time() < deadline:
            self.step()
            if self.cur_nimg - tick_nimg >= self.cfg.kimg_per_tick * 1000 or self.cur_nimg >= max_kimg * 1000:
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                now = time.time()
                seconds, done = now - tick_start, self.cur_nimg - tick_nimg
                log(json.dumps({"kimg": round(self.cur_nimg / 1000, 3), "sec_per_kimg": round(seconds / done * 1000, 3),
                                "imgs_per_s": round(done / seconds, 1), "augment_p": round(self.augment_p, 4),
                                **self._flush_stats(), "minutes": round((now - start) / 60, 2)}))
                tick_start, tick_nimg = now, self.cur_nimg
            if self.cur_nimg >= next_snap:
                self.save_snapshot()
                next_snap += snap_nimg
        path = self.save_snapshot()
        log(json.dumps({"snapshot": str(path), "kimg": self.cur_nimg / 1000, "augment_p": round(self.augment_p, 4),
                        "minutes": round((time.time() - start) / 60, 2)}))
        return path


# --- command line ----------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pack", action="store_true", help="pack --utkface into --out instead of training")
    parser.add_argument("--utkface", metavar="ZIP", help="(--pack) UTKFace aligned & cropped zip")
    parser.add_argument("--resolution", type=int, choices=(16, 32, 64, 128), default=64, help="(--pack) side in px")
    parser.add_argument("--limit", type=int, default=None, help="(--pack) only the first N faces by name")
    parser.add_argument("--out", metavar="DATA.npz", help="(--pack) packed dataset to write")
    parser.add_argument("--jpeg-quality", type=int, default=None, metavar="Q",
                        help="(--pack) store JPEG (e.g. 90) instead of raw pixels: ~5x smaller files")
    parser.add_argument("--data", metavar="DATA.npz", help="packed dataset to train on")
    parser.add_argument("--outdir", metavar="DIR", help="snapshots, ship files and sample grids go here")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="64")
    parser.add_argument("--resume", metavar="network-snapshot-*.pt", help="continue this run (its config wins)")
    parser.add_argument("--batch", type=int, help="override the preset's batch (gamma follows unless given)")
    parser.add_argument("--gamma", type=float, help="override the R1 weight")
    parser.add_argument("--pl-weight", type=float, help="path-length weight (0 disables)")
    parser.add_argument("--no-augment", action="store_true", help="disable ADA")
    parser.add_argument("--ada-kimg", type=float, help="kimg for p to go from 0 to 1 (official: 500)")
    parser.add_argument("--max-kimg", type=float, default=25000, help="stop after this many thousand images")
    parser.add_argument("--minutes", type=float, default=None, help="stop cleanly after M minutes, with a snapshot")
    parser.add_argument("--snap-kimg", type=float, default=None, help="snapshot every this many kimg")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-amp", action="store_true", help="float32 on CUDA too (CPU always is)")
    parser.add_argument("--channels-last", action="store_true", help="channels_last memory format for D")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads")


def _config_from_args(args: argparse.Namespace) -> TrainConfig:
    cfg = PRESETS[args.preset]
    if args.batch:
        cfg = replace(cfg, batch=args.batch, r1_gamma=_auto_gamma(cfg.resolution, args.batch))
    overrides = {"r1_gamma": args.gamma, "pl_weight": args.pl_weight, "ada_kimg": args.ada_kimg}
    cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    return replace(cfg, augment=False) if args.no_augment else cfg


def _pack(args: argparse.Namespace, device: torch.device) -> int:
    from pipeline.detect import DetectorConfig, build_detector
    from pipeline.generate.dataset import pack_utkface
    from pipeline.runtime import cache_dir

    if not (args.utkface and args.out):
        raise SystemExit("facechange: --pack needs --utkface and --out")
    detector = build_detector(DetectorConfig(attribute_weights=None), device, cache_dir())

    def best_landmarks(rgb: np.ndarray) -> np.ndarray | None:
        faces = detector.detect(rgb)
        return max(faces, key=lambda f: f.score).landmarks if faces else None

    report = pack_utkface(Path(args.utkface), Path(args.out), args.resolution, best_landmarks, limit=args.limit,
                          jpeg_quality=args.jpeg_quality, log=lambda line: print(line, file=sys.stderr, flush=True))
    print(json.dumps(report, indent=2))
    return 0


def run_from_args(args: argparse.Namespace) -> int:
    from pipeline.runtime import resolve_device, set_threads

    set_threads(args.threads)
    device = resolve_device(args.device)
    if args.pack:
        return _pack(args, device)
    if not (args.data and args.outdir):
        raise SystemExit("facechange: training needs --data and --outdir (or --pack to build the data)")
    data = load_packed(args.data)
    outdir = Path(args.outdir)
    amp = not args.no_amp
    if args.resume:
        trainer = Trainer.resume(Path(args.resume), data, outdir, device, amp=amp, channels_last=args.channels_last)
    else:
        trainer = Trainer(_config_from_args(args), data, outdir, device, seed=args.seed, amp=amp,
                          channels_last=args.channels_last)
    print(json.dumps({"config": asdict(trainer.cfg), "device": str(device), "amp": trainer.amp,
                      "train_faces": len(trainer.images), "kimg": trainer.cur_nimg / 1000}), flush=True)
    trainer.train(args.max_kimg, minutes=args.minutes, snap_kimg=args.snap_kimg,
                  log=lambda line: print(line, flush=True))
    return 0
