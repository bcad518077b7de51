"""``pepeseg3d priors``: SAM masks and Depth-Anything-V2 depth of every training image, cached on disk.

The images are the ones ``ns-train`` trains on: the command builds the same datamanager (``--data``, the same
dataparser subcommand and options, ``--camera-res-scale-factor``) and computes the priors of the images it hands
over, undistorted, cropped and downscaled as nerfstudio does. Re-running is cheap: healthy entries made with the
same settings are skipped, damaged ones are recomputed and reported, an interrupted run resumes, and ``--shard
I/N`` splits the work over N processes sharing one cache. ``--check`` reports the cache's health without
computing; ``--export-images DIR`` writes the training images for a model of your own, whose output
``--masks-from`` / ``--depth-from`` import.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from nerfstudio.configs.dataparser_configs import AnnotatedDataParserUnion

from pepeseg3d_ns.data.dataparser import PepeDataParserConfig
from pepeseg3d_ns.priors.sources import PriorSourcesConfig

__all__ = ["Priors"]


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024.0
    return f"{n:.1f} GiB"


@dataclass
class Priors(PriorSourcesConfig):
    """Compute the perception priors (SAM masks at every granularity + relative depth) of the images ns-train
    trains on, cached in <data>/pepe_priors/; give the same dataparser subcommand and options as to ns-train."""

    data: Optional[Path] = None
    """Scene folder (as given to ns-train --data)."""
    camera_res_scale_factor: float = 1.0
    """As --pipeline.datamanager.camera-res-scale-factor of ns-train (images rescaled by this factor)."""
    cache_dir: Optional[Path] = None
    """Cache folder (as --pipeline.datamanager.priors-dir of ns-train); default <data>/pepe_priors."""
    force: bool = False
    """Recompute every image even when its entry is healthy and made with the same settings."""
    check: bool = False
    """Only report the cache's health for these images (missing, damaged, made with other settings); exit status
    1 when any is not usable. Computes nothing."""
    export_images: Optional[Path] = None
    """Only write the training images, exactly as the model sees them, as <stem>.png into this folder (to run a
    model of your own on them and import its output with --masks-from / --depth-from)."""
    shard: Optional[str] = None
    """I/N: compute only images I, I+N, I+2N, ... (run N processes, e.g. one per GPU, on one cache)."""
    progress: bool = True
    """Show a progress bar."""
    preview: bool = True
    """Also write preview.png into the cache: three views, their mask layers in colour and the depth prior."""
    dataparser: AnnotatedDataParserUnion = field(default_factory=PepeDataParserConfig)
    """The dataparser ns-train uses (subcommand and its options, as for ns-train)."""

    # ------------------------------------------------------------------
    def datamanager_config(self):
        """The PepeDatamanagerConfig whose training images get the priors (priors off: nothing attached)."""
        from pepeseg3d_ns.data.datamanager import PepeDatamanagerConfig

        return PepeDatamanagerConfig(data=self.data, dataparser=self.dataparser, priors="off", priors_dir=self.cache_dir,
                                     camera_res_scale_factor=self.camera_res_scale_factor, cache_images="cpu")

    def main(self) -> None:
        from pepeseg3d_ns.priors.cache import PriorCache, PriorCacheError
        from pepeseg3d_ns.priors.compute import compute_priors, datamanager_images, parse_shard

        from pepeseg3d_ns.errors import UserError

        if self.data is None:
            raise UserError("--data SCENE is required (the folder you give ns-train --data)")
        if not Path(self.data).exists():
            raise UserError(f"--data {self.data} does not exist")
        if not self.camera_res_scale_factor > 0:
            raise UserError(f"--camera-res-scale-factor {self.camera_res_scale_factor}: must be > 0")
        try:
            shard = parse_shard(self.shard)
        except ValueError as err:
            raise UserError(str(err)) from None
        dm_cfg = self.datamanager_config()
        try:
            dm = dm_cfg.setup(device="cpu", test_mode="val", world_size=1, local_rank=0)
            images = datamanager_images(dm, "train")
        except (FileNotFoundError, ValueError) as err:
            raise UserError(str(err)) from None
        if self.export_images is not None:
            self._export(images)
            return
        cache_dir = dm.prior_cache_dir()
        if self.check:
            raise SystemExit(self._check(cache_dir, images))
        try:
            cache = PriorCache.open(cache_dir, create=True)
            mask_source, depth_source = self.build(dm.data_dir(), flag_prefix="--")
            stats = compute_priors(cache, images, mask_source, depth_source, force=self.force, progress=self.progress,
                                   shard=shard)
        except (FileNotFoundError, ImportError, ValueError) as err:  # PriorCacheError is a ValueError
            raise UserError(str(err)) from None
        for problem in stats.repaired:
            print(f"repaired: {problem}")
        mine = images[shard[0]::shard[1]]
        if self.preview and mine and shard == (0, 1):
            from pepeseg3d_ns.data.preview import priors_preview

            picks = [mine[i * (len(mine) - 1) // 2] for i in range(3)] if len(mine) >= 3 else mine
            print(f"preview: {priors_preview(cache, picks, cache.cache_dir / 'preview.png')}")
        n_masks = [cache.read_entry(im.key)["masks"]["n_masks"] for im in mine]
        kind = getattr(mask_source, "kind", None) or ("simulated" if mask_source.name == "simulated" else "computed")
        hw = f"{mine[0].hw[0]}x{mine[0].hw[1]}" if mine else "-"
        print(
            f"priors ({kind} masks, {getattr(depth_source, 'name', '?')} depth) of {stats.n_images} training images "
            f"({hw}){'' if shard == (0, 1) else f', shard {shard[0]}/{shard[1]}'}: {stats.computed} computed, "
            f"{stats.skipped} skipped, {len(stats.repaired)} repaired in {stats.seconds:.1f} s; "
            f"{(sum(n_masks) / max(len(n_masks), 1)):.1f} masks/image; "
            f"{_human_bytes(cache.size_bytes([im.key for im in mine]))} on disk in {cache.cache_dir}"
        )

    def _export(self, images) -> None:
        from PIL import Image

        out = Path(self.export_images)
        out.mkdir(parents=True, exist_ok=True)
        for im in images:
            Image.fromarray(im.image).save(out / f"{im.stem}.png")
        print(f"wrote {len(images)} training images ({images[0].hw[0]}x{images[0].hw[1]}) to {out}; run your model on "
              f"them, then import its output with `pepeseg3d priors --data {self.data} --masks-from MASKS "
              f"[--depth-from DEPTH]` (same dataparser arguments)")

    def _check(self, cache_dir: Path, images) -> int:
        """Print the health of the entries of ``images``; 0 when all are usable, else 1."""
        from pepeseg3d_ns.priors.cache import PriorCache, PriorCacheError

        try:
            cache = PriorCache.open(cache_dir)
        except PriorCacheError as err:
            print(f"pepeseg3d priors --check: {err}")
            return 1
        ok, missing, damaged, settings = 0, [], [], {}
        for im in images:
            problem = cache.check_entry(im.key, deep=True)
            if problem is None:
                ok += 1
                e = cache.read_entry(im.key)
                sig = (e["masks"]["source"]["name"], e["masks"]["signature_digest"], e["depth"]["source"]["name"],
                       e["depth"]["signature_digest"])
                settings.setdefault(sig, []).append(im.stem)
            elif cache.entry_path(im.key).is_file():
                damaged.append(problem)
            else:
                missing.append(im.stem)
        print(f"{cache.cache_dir}: {len(images)} training images: {ok} healthy, {len(missing)} missing, "
              f"{len(damaged)} damaged")
        for d in damaged[:20]:
            print(f"  damaged: {d}")
        if missing:
            print(f"  missing: {', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}")
        for (mn, md, dn, dd), stems in settings.items():
            print(f"  {len(stems)} made by {mn} masks ({md}) + {dn} depth ({dd})")
        mixed = len(settings) > 1
        if mixed:
            print("  the entries were made with different settings: re-run `pepeseg3d priors` with the settings you want")
        return 0 if (ok == len(images) and not mixed) else 1
