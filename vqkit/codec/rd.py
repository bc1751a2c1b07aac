"""Rate-distortion: ``.vq`` files beside JPEG and WebP over a folder of images.

For every image and every codec setting we measure the rate in bits per pixel (the whole file,
header included, over the original H x W pixels) and the distortion as PSNR,
``10 log10(255^2 / MSE)`` over all channels, and MS-SSIM (Wang, Simoncelli and Bovik 2003:
5 scales, Gaussian window 11 / sigma 1.5, the paper's weights; ``pytorch_msssim``), then
average each over the images. JPEG and WebP come from Pillow (libjpeg with 4:2:0 chroma
subsampling and optimised Huffman tables, libwebp's lossy mode) at several qualities, coded in
memory. The optimised tables matter at low rates: with libjpeg's default tables a quality-2
file of the benchmark's held-out photos is twice as large (0.162 against 0.082 bits per pixel,
the same pixels), which would flatter any codec compared with it.

A hierarchy's ``.vq`` file is progressive: the header and its top ``p`` levels' bytes decode a
preview, so each prefix is an operating point of the same file too (setting ``MODE:p/L``: the
bits per pixel of those first bytes, the PSNR of their preview).

``matched`` puts each ``.vq`` operating point beside JPEG and WebP *at the same rate*: their
PSNR and MS-SSIM curves (mean rate against mean distortion over the qualities) are linearly
interpolated at the ``.vq`` point's bits per pixel; a rate outside a curve's range gives None.
``beside`` looks from the other side, with no interpolation: each JPEG or WebP setting beside
the best ``.vq`` point that costs no more bits per pixel, which still answers when a ``.vq``
point lies below JPEG's lowest rate.
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pytorch_msssim import ms_ssim as _ms_ssim
from tqdm import tqdm

from vqkit.codec.codec import Codec
from vqkit.codec.packing import uniform_payload_bytes
from vqkit.data.images import IMAGE_SUFFIXES, load_image, psnr_from_mse
from vqkit.errors import UsageError
from vqkit.fsutil import atomic_path
from vqkit.runs import checkpoint as ckpt

# Dense at low qualities, where JPEG's PSNR climbs fastest per bit, so that its value
# interpolated at a .vq file's rate is close to a file JPEG can actually write.
QUALITIES = (1, 3, 4, 5, 6, 8, 10, 15, 20, 30, 50, 75, 90)
# MS-SSIM downsamples four times and then needs room for its 11-pixel window.
MS_SSIM_MIN_SIDE = 161


def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """PSNR in dB of two uint8 images (C, H, W); inf when they are equal."""
    return psnr_from_mse(float(((x.double() - y.double()) ** 2).mean()))


def ms_ssim(x: torch.Tensor, y: torch.Tensor) -> float:
    """MS-SSIM of two uint8 images (C, H, W), in [0, 1]; NaN below MS_SSIM_MIN_SIDE pixels."""
    if min(x.shape[1:]) < MS_SSIM_MIN_SIDE:
        return math.nan
    return float(_ms_ssim(x[None].double(), y[None].double(), data_range=255.0))


def pillow_roundtrip(image: torch.Tensor, fmt: str, quality: int) -> tuple[int, torch.Tensor]:
    """Code a uint8 image (C, H, W) with Pillow's ``fmt`` ("JPEG" or "WEBP") at ``quality``;
    return the file's size in bytes and the decoded image."""
    array = image.permute(1, 2, 0).numpy()
    pil = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
    buffer = io.BytesIO()
    pil.save(buffer, format=fmt, quality=quality, **({"optimize": True} if fmt == "JPEG" else {}))
    with Image.open(io.BytesIO(buffer.getvalue())) as decoded:
        back = np.array(decoded.convert(pil.mode))
    back = back[:, :, None] if back.ndim == 2 else back
    return buffer.tell(), torch.from_numpy(back).permute(2, 0, 1).contiguous()


@dataclass
class Point:
    """One setting of one method, averaged over the images. ``method`` is "jpeg", "webp", or
    a codec's name with "prior" or "uniform"; ``setting`` the quality or the coding mode. The
    timings and ``saving`` are for ``.vq`` points: seconds per megapixel, and the prior-coded
    payload over the uniform payload of the same codes."""

    method: str
    setting: str
    bpp: float
    psnr: float
    ms_ssim: float
    encode_s_per_mp: float | None = None
    decode_s_per_mp: float | None = None
    saving: float | None = None


@dataclass
class Matched:
    """A ``.vq`` point and JPEG's and WebP's PSNR / MS-SSIM interpolated at its rate."""

    point: Point
    jpeg_psnr: float | None
    jpeg_ms_ssim: float | None
    webp_psnr: float | None
    webp_ms_ssim: float | None


@dataclass
class Beside:
    """A JPEG or WebP point and the ``.vq`` point of highest PSNR among those of no more bits
    per pixel (None when every ``.vq`` point costs more)."""

    point: Point
    vq: Point | None


@dataclass
class RDResult:
    images: list[str]
    pixels: int
    points: list[Point] = field(default_factory=list)

    def curve(self, method: str) -> list[Point]:
        return sorted((p for p in self.points if p.method == method), key=lambda p: p.bpp)

    def matched(self) -> list[Matched]:
        out = []
        for p in self.points:
            if p.method in ("jpeg", "webp"):
                continue
            jpeg, webp = self.curve("jpeg"), self.curve("webp")
            out.append(Matched(p, _interp(jpeg, p.bpp, "psnr"), _interp(jpeg, p.bpp, "ms_ssim"),
                               _interp(webp, p.bpp, "psnr"), _interp(webp, p.bpp, "ms_ssim")))
        return out

    def beside(self) -> list[Beside]:
        vq = [p for p in self.points if p.method not in ("jpeg", "webp")]
        out = []
        for p in self.curve("jpeg") + self.curve("webp"):
            cheaper = [q for q in vq if q.bpp <= p.bpp]
            out.append(Beside(p, max(cheaper, key=lambda q: q.psnr) if cheaper else None))
        return out

    def to_dict(self) -> dict:
        return {"images": self.images, "pixels": self.pixels, "points": [asdict(p) for p in self.points],
                "matched": [{**asdict(m), "point": asdict(m.point)} for m in self.matched()],
                "beside": [asdict(b) for b in self.beside()]}

    def table(self) -> str:
        rows = [f"{'method':<24} {'setting':>8} {'bpp':>7} {'PSNR dB':>8} {'MS-SSIM':>8} "
                f"{'enc s/MP':>9} {'dec s/MP':>9} {'prior/unif':>10}"]
        for p in self.points:
            rows.append(f"{p.method:<24} {p.setting:>8} {p.bpp:7.4f} {p.psnr:8.2f} {p.ms_ssim:8.4f} "
                        f"{_fmt(p.encode_s_per_mp, 9, 2)} {_fmt(p.decode_s_per_mp, 9, 2)} {_fmt(p.saving, 10, 3)}")
        rows.append("")
        rows.append("at the same bits per pixel (JPEG and WebP interpolated; - where outside their range):")
        rows.append(f"{'method':<24} {'bpp':>7} {'PSNR':>7} {'JPEG':>7} {'WebP':>7} {'MS-SSIM':>8} "
                    f"{'JPEG':>8} {'WebP':>8}")
        for m in self.matched():
            p = m.point
            rows.append(f"{p.method:<24} {p.bpp:7.4f} {p.psnr:7.2f} {_fmt(m.jpeg_psnr, 7, 2)} "
                        f"{_fmt(m.webp_psnr, 7, 2)} {p.ms_ssim:8.4f} {_fmt(m.jpeg_ms_ssim, 8, 4)} "
                        f"{_fmt(m.webp_ms_ssim, 8, 4)}")
        rows.append("")
        rows.append("JPEG and WebP beside the best .vq point of no more bits per pixel (where the .vq point "
                    "wins, and the first setting after a win where it does not):")
        rows.append(f"{'method':<6} {'setting':>7} {'bpp':>7} {'PSNR':>7} {'MS-SSIM':>8}   {'.vq point':<24} "
                    f"{'bpp':>7} {'PSNR':>7} {'MS-SSIM':>8} {'gain dB':>8}")
        beside = self.beside()
        for fmt in ("jpeg", "webp"):
            settings = [b for b in beside if b.point.method == fmt]
            wins = [b.vq is not None and b.vq.psnr > b.point.psnr for b in settings]
            for i, b in enumerate(settings):
                p, q = b.point, b.vq
                if wins[i] or (i > 0 and wins[i - 1]):
                    rows.append(f"{p.method:<6} {p.setting:>7} {p.bpp:7.4f} {p.psnr:7.2f} {p.ms_ssim:8.4f}   "
                                f"{q.method:<24} {q.bpp:7.4f} {q.psnr:7.2f} {q.ms_ssim:8.4f} "
                                f"{q.psnr - p.psnr:+8.2f}")
            if not any(wins):
                rows.append(f"{fmt:<6} beats every .vq point of no more bits at each of its settings")
        return "\n".join(rows)


def _fmt(value: float | None, width: int, digits: int) -> str:
    return f"{'-':>{width}}" if value is None or math.isnan(value) else f"{value:{width}.{digits}f}"


def _interp(curve: list[Point], bpp: float, what: str) -> float | None:
    if len(curve) < 2 or not curve[0].bpp <= bpp <= curve[-1].bpp:
        return None
    return float(np.interp(bpp, [p.bpp for p in curve], [getattr(p, what) for p in curve]))


def codecs_for(runs: Sequence[str | Path], priors: Sequence[str | Path] = (),
               which: str = ckpt.BEST) -> dict[str, Codec]:
    """One codec per stage-1 run, named after its folder, each with the prior runs (given
    top-first per model, at their checkpoint ``which``) that were fitted to its latest
    checkpoint, matched by fingerprint."""
    matched: dict[Path, list[Path]] = {Path(run): [] for run in runs}
    fingerprints = {ckpt.latest_checkpoint(run).state.get("fingerprint"): run for run in matched}
    for prior in map(Path, priors):
        source = ckpt.read_config(prior, kind="prior").get("source") or {}
        run = fingerprints.get(source.get("fingerprint"))
        if run is None:
            raise UsageError(f"{prior}: fitted to none of the models given ({', '.join(map(str, runs))})")
        matched[run].append(prior)
    return {run.name: Codec.load(run, run_priors, which) for run, run_priors in matched.items()}


def image_files(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"{folder}: no such folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UsageError(f"{folder}: holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def measure(codecs: dict[str, Codec], files: Sequence[Path], qualities: Sequence[int] = QUALITIES,
            progress: bool = True) -> RDResult:
    """Rate and distortion of every codec (prior mode where it has priors, and uniform mode)
    and of JPEG and WebP at ``qualities``, over the image ``files``."""
    channels = {c.model.config.in_channels for c in codecs.values()} or {3}
    if len(channels) != 1:
        raise UsageError("the codecs take images of different channel counts; compare them separately")
    channel = channels.pop()
    images = [(p.name, load_image(p, None, channel)) for p in files]
    pixels = sum(im.shape[1] * im.shape[2] for _, im in images)
    rows: dict[tuple[str, str], list[dict]] = {}

    def add(method: str, setting: str, image: torch.Tensor, size: int, decoded: torch.Tensor, **extra) -> None:
        rows.setdefault((method, setting), []).append(
            {"bpp": 8 * size / (image.shape[1] * image.shape[2]), "psnr": psnr(image, decoded),
             "ms_ssim": ms_ssim(image, decoded), "mp": image.shape[1] * image.shape[2] / 1e6, **extra})

    for name, image in tqdm(images, desc="rd", disable=not progress):
        for fmt in ("JPEG", "WEBP"):
            for q in qualities:
                size, decoded = pillow_roundtrip(image, fmt, q)
                add(fmt.lower(), str(q), image, size, decoded)
        for codec_name, codec in codecs.items():
            for mode in codec.modes:
                start = time.perf_counter()
                compressed = codec.compress(image, mode)
                encoded = time.perf_counter()
                decoded = codec.decompress(compressed.data, name)
                finished = time.perf_counter()
                h = compressed.header
                same_codes = uniform_payload_bytes([lh * lw for lh, lw, _ in h.levels], [k for _, _, k in h.levels])
                add(f"{codec_name} {mode}", mode, image, len(compressed.data), decoded,
                    encode=encoded - start, decode=finished - encoded, payload=h.payload_length,
                    uniform_payload=same_codes)
                levels = len(h.levels)
                for upto in range(1, levels):  # the same file's previews: its first bytes alone
                    size = compressed.prefix_bytes(upto)
                    add(f"{codec_name} {mode}", f"{mode}:{upto}/{levels}", image, size,
                        codec.decompress(compressed.data[:size], name))

    result = RDResult([name for name, _ in images], pixels)
    for (method, setting), values in rows.items():
        mean = {k: float(np.mean([v[k] for v in values])) for k in ("bpp", "psnr", "ms_ssim")}
        point = Point(method, setting, **mean)
        if "encode" in values[0]:
            mp = sum(v["mp"] for v in values)
            point.encode_s_per_mp = sum(v["encode"] for v in values) / mp
            point.decode_s_per_mp = sum(v["decode"] for v in values) / mp
            point.saving = sum(v["payload"] for v in values) / sum(v["uniform_payload"] for v in values)
        result.points.append(point)
    return result


def plot(result: RDResult, path: str | Path) -> None:
    """PSNR and MS-SSIM against bits per pixel, one curve per method, written as a PNG."""
    # Imported here: matplotlib takes a second to load, which no other command should pay.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2))
    axes = fig.subplots(1, 2)
    methods = list(dict.fromkeys(p.method for p in result.points))
    for ax, what, label in zip(axes, ("psnr", "ms_ssim"), ("PSNR (dB)", "MS-SSIM")):
        for method in methods:
            curve = result.curve(method)
            # A hierarchy's previews and its whole file: points of one progressive file, joined.
            style = "o-" if method in ("jpeg", "webp") else ("*-" if len(curve) > 1 else "*")
            ax.plot([p.bpp for p in curve], [getattr(p, what) for p in curve], style,
                    label=method.upper() if method in ("jpeg", "webp") else method,
                    markersize=6 if method in ("jpeg", "webp") else 12)
        # Logarithmic: low rates, where the codecs differ most, would otherwise share a corner.
        ax.set_xscale("log")
        ax.set_xlabel("bits per pixel (log scale)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"rate-distortion over {len(result.images)} image(s), {result.pixels / 1e6:.2f} MP")
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
