"""Export a prior as a MONAI bundle (``klip-med export-bundle``).

A bundle is a folder MONAI's tools understand (https://docs.monai.io/en/latest/mb_specification.html)::

    <name>/
      configs/metadata.json        MONAI's required keys (validated against the 20240725 schema)
      configs/inference.json       LoadImaged -> EnsureChannelFirstd -> Orientationd -> KLIPReconstructd -> SaveImaged
      configs/logging.conf
      configs/meta_schema_20240725.json   MONAI's metadata schema (Apache-2.0), for offline verify_metadata
      models/config.json, models/weights.safetensors, models/nulls/*.json   the klip-med prior folder
      docs/README.md               how to run it, the model card, the licences
      sample_data/*.nii.gz         (optional) an input to run on

Weights stay safetensors (klip_med never reads pickles), so the bundle has no ``models/model.pt``;
``KLIPReconstructd`` loads ``models/`` as a prior folder. Run it offline::

    python -m monai.bundle verify_metadata --meta_file B/configs/metadata.json \\
        --filepath B/configs/meta_schema_20240725.json --hash_val 76e1add273836515d0bbb3bc71962474
    python -m monai.bundle run --config_file B/configs/inference.json --bundle_root B [--samples 1 --steps 10]

(``verify_metadata`` downloads the schema named in the metadata to ``--filepath`` unless a file is
already there; with the shipped copy and its MD5 it neither downloads nor trusts a changed file.)
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from klip_med.errors import expect
from klip_med.priors.config import PriorConfig
from klip_med.priors.diffusion import CONFIG_FILE, WEIGHTS_FILE
from klip_med.priors.registry import resolve_prior_path

SCHEMA_NAME = "meta_schema_20240725.json"
SCHEMA_URL = f"https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/{SCHEMA_NAME}"
SCHEMA_MD5 = "76e1add273836515d0bbb3bc71962474"
SCHEMA_FILE = Path(__file__).resolve().parent / "monai_bundle" / SCHEMA_NAME
OUTPUTS = ("recon", "klip", "std", "klip_z")
"""What ``KLIPReconstructd`` adds (``klip_z`` only when a null model applies); each is saved as ``<stem>_<name>.nii.gz``."""
REFERENCES = [
    "Kheirandish, Hong, Fridovich-Keil. KLIP: KL divergence between prior and posterior sampling paths "
    "for out-of-distribution localisation in diffusion posterior reconstruction. CVPR 2026.",
    "Chung, Lee, Ye. Decomposed Diffusion Sampler for accelerating large-scale inverse problems. ICLR 2024.",
    "Ho, Jain, Abbeel. Denoising diffusion probabilistic models. NeurIPS 2020.",
]
LOGGING_CONF = """[loggers]
keys=root

[handlers]
keys=consoleHandler

[formatters]
keys=fullFormatter

[logger_root]
level=INFO
handlers=consoleHandler

[handler_consoleHandler]
class=StreamHandler
level=INFO
formatter=fullFormatter
args=(sys.stdout,)

[formatter_fullFormatter]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""


def _versions() -> dict[str, str]:
    import deepinv
    import monai
    import nibabel
    import numpy
    import safetensors
    import torch

    import klip_med

    return {"monai": monai.__version__, "torch": torch.__version__.split("+")[0], "numpy": numpy.__version__,
            "klip-med": klip_med.__version__, "deepinv": deepinv.__version__, "nibabel": nibabel.__version__,
            "safetensors": safetensors.__version__}


def _tensor(kind: str, fmt: str, shape: list, dtype: str, value_range: list, channel: str) -> dict[str, Any]:
    return {"type": kind, "format": fmt, "num_channels": 1 if shape else 0, "spatial_shape": shape, "dtype": dtype,
            "value_range": value_range, "is_patch_data": False, "channel_def": {"0": channel} if shape else {}}


def metadata(config: PriorConfig, physics: str) -> dict[str, Any]:
    """``configs/metadata.json`` for a prior: MONAI's required keys plus what the network and pipeline do."""
    v = _versions()
    size = [config.image_size, config.image_size]
    intensity = config.intensity.to_dict()
    is_ct = config.modality == "CT"
    unit = "HU" if is_ct else "MR signal"
    physical = [intensity["hu_min"], intensity["hu_max"]] if is_ct else []
    licence = config.training.get("licence", "see the prior's model card")
    return {
        "schema": SCHEMA_URL,
        "version": v["klip-med"],
        "changelog": {v["klip-med"]: f"exported by klip-med export-bundle from prior {config.name!r}"},
        "monai_version": v["monai"],
        "pytorch_version": v["torch"],
        "numpy_version": v["numpy"],
        "required_packages_version": {k: v[k] for k in ("klip-med", "deepinv", "nibabel", "safetensors")},
        "task": f"Diffusion posterior reconstruction of {config.modality} slices from simulated or given "
                f"measurements ({physics} by default), with KLIP out-of-distribution maps",
        "description": (f"{config.description}. A MONAI DiffusionModelUNet epsilon prior "
                        f"({config.image_size}x{config.image_size}, DDPM {config.schedule['schedule']} schedule over "
                        f"{config.schedule['num_train_timesteps']} steps) inside klip-med's posterior sampler; the "
                        "inference config runs klip_med.monai.KLIPReconstructd: posterior mean, posterior std and "
                        "the KLIP map (nats per pixel: the KL between the prior's and the posterior's sampling "
                        "steps), and a calibrated z map when a shipped null model matches the settings."),
        "authors": "klip_med developers",
        "copyright": "klip_med code: Apache-2.0. Weights: trained by klip-med on data under the licence in "
                     f"data_source ({licence})",
        "data_source": f"manifest {config.training.get('manifest')} ({config.training.get('manifest_file')}, "
                       f"split {config.training.get('split')}); licence: {licence}",
        "data_type": "nibabel",
        "image_classes": f"one-channel {config.modality} slice or volume in {unit} (slices along the last axis)",
        "pred_classes": "image_recon: posterior mean (input units); image_std: posterior std (input units); "
                        "image_klip: KLIP, nats per pixel; image_klip_z: block z-scores against healthy data "
                        "(only with a matching null model)",
        "eval_metrics": {},
        "intended_use": "Research only: out-of-distribution localisation in diffusion posterior reconstruction. "
                        "Not for clinical use.",
        "references": REFERENCES,
        "network_data_format": {
            "inputs": {
                "x": _tensor("image", "noisy image x_t", size, "float32", [-1.0, 1.0],
                             f"{config.modality} image in the prior's [-1, 1] range plus noise"),
                "timesteps": _tensor("tensor", "training timestep", [], "int64",
                                     [0, config.schedule["num_train_timesteps"] - 1], "timestep"),
            },
            "outputs": {"pred": _tensor("image", "epsilon (predicted noise)", size, "float32", [], "noise")},
            "post_processed_outputs": {
                "image_recon": _tensor("image", "hounsfield" if is_ct else "magnitude", ["*", "*"], "float32",
                                       physical, f"posterior mean, {unit}"),
                "image_std": _tensor("image", "standard deviation", ["*", "*"], "float32", [],
                                     f"posterior std, {unit}"),
                "image_klip": _tensor("image", "nats per pixel", ["*", "*"], "float32", [], "KLIP"),
            },
        },
    }


def inference_config(physics: str, samples: int = 4, steps: int = 50, sampler: str = "fast",
                     seed: int = 0) -> dict[str, Any]:
    """``configs/inference.json``: every NIfTI in ``input_dir`` through KLIPReconstructd, outputs to ``output_dir``.

    Overridable from the command line (``--samples 1 --steps 10 --input_dir DIR --output_dir DIR
    --physics "..." --device cuda --null none --mr_scale 1234.5``).
    """
    save = {name: {"_target_": "SaveImaged", "keys": f"image_{name}", "output_dir": "@output_dir",
                   "output_postfix": name, "separate_folder": False, "print_log": False,
                   "allow_missing_keys": name == "klip_z"} for name in OUTPUTS}
    return {
        "imports": ["$import glob", "$import os"],
        "bundle_root": ".",
        "device": "cpu",
        "prior_dir": "$@bundle_root + '/models'",
        "physics": physics,
        "samples": samples,
        "steps": steps,
        "sampler": sampler,
        "seed": seed,
        "null": "auto",
        "mr_scale": None,
        "input_dir": "$@bundle_root + '/sample_data'",
        "output_dir": "$@bundle_root + '/eval'",
        "datalist": "$[{'image': f} for f in sorted(glob.glob(os.path.join(@input_dir, '*.nii*')))]",
        "reconstruct": {
            "_target_": "klip_med.monai.KLIPReconstructd", "keys": "image", "prior": "@prior_dir",
            "physics": "@physics", "samples": "@samples", "steps": "@steps", "sampler": "@sampler",
            "seed": "@seed", "device": "@device", "null": "@null", "mr_scale": "@mr_scale",
        },
        **{f"save_{name}": save[name] for name in OUTPUTS},
        "inference": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": "image", "reader": "NibabelReader"},
            {"_target_": "EnsureChannelFirstd", "keys": "image"},
            {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS", "labels": None},
            "@reconstruct", *(f"@save_{name}" for name in OUTPUTS)]},
        "run": ["$[@inference(item) for item in @datalist]"],
    }


def readme(config: PriorConfig, physics: str, card: str, sample: str | None, sample_note: str = "") -> str:
    """``docs/README.md``: how to run the bundle, then the prior's model card and the licences."""
    licence = config.training.get("licence", "see the model card below")
    run_on = f"`sample_data/{sample}`" if sample else "the NIfTI files in `sample_data/` (put yours there)"
    return f"""# MONAI bundle: klip-med prior `{config.name}`

Diffusion posterior reconstruction with KLIP out-of-distribution maps. `configs/inference.json` runs
`LoadImaged -> EnsureChannelFirstd -> Orientationd -> klip_med.monai.KLIPReconstructd -> SaveImaged` on
{run_on}: it simulates the measurement `{physics}` from each image, reconstructs it with this
prior and writes `<stem>_recon`, `_std`, `_klip` (nats per pixel) and, when a shipped null model matches the
settings, `_klip_z` NIfTIs to `eval/`. It needs `pip install klip-med` (which brings MONAI, deepinv, nibabel).

```bash
# offline: the schema ships in configs/; with a file at --filepath MONAI does not download
python -m monai.bundle verify_metadata --meta_file configs/metadata.json \\
    --filepath configs/{SCHEMA_NAME} --hash_val {SCHEMA_MD5}
python -m monai.bundle run --config_file configs/inference.json --bundle_root .
# quicker, another input folder, GPU:
python -m monai.bundle run --config_file configs/inference.json --bundle_root . --samples 1 --steps 10 \\
    --input_dir /data/nifti --output_dir /tmp/out --device cuda
```

Overridable: `physics`, `samples`, `steps`, `sampler` (`fast` or `dps`), `seed`, `null` (`auto`, `none` or a
`klip-med calibrate` JSON), `mr_scale` (MR: the patient volume's scale, see `klip_med.priors.intensity`),
`device`, `input_dir`, `output_dir`. The weights are `models/weights.safetensors` with `models/config.json`
(klip-med never loads pickled checkpoints, so there is no `models/model.pt`); `models/nulls/` holds the
null models calibrated for this prior.

## Licences
- Weights: trained on data whose terms bind them: {licence}.
- klip-med code: Apache-2.0.
- `configs/{SCHEMA_NAME}`: MONAI's bundle metadata schema, (c) MONAI Consortium, Apache-2.0, unchanged.
{f"- `sample_data/{sample}`: {sample_note}" if sample and sample_note else ""}

## Model card

{card}
"""


def export_bundle(prior: str | Path, out: str | Path, physics: str, *, sample: str | Path | None = None,
                  sample_note: str = "", samples: int = 4, steps: int = 50, sampler: str = "fast", seed: int = 0,
                  overwrite: bool = False) -> Path:
    """Write ``prior`` (a shipped name or a prior folder) as a MONAI bundle folder ``out``.

    Args:
        physics: the default measurement of ``configs/inference.json`` (a ``klip_med.physics`` spec).
        sample: an input NIfTI copied to ``sample_data/`` (the default input folder of the config).
        sample_note: its source and licence, for ``docs/README.md``.
        samples, steps, sampler, seed: the config's defaults (overridable when the bundle runs).
        overwrite: replace an existing bundle at ``out`` (only a folder holding ``configs/metadata.json``).

    Returns:
        ``out``. The folder is written next to ``out`` and renamed into place, so an interrupted export
        leaves no half bundle.
    """
    source = resolve_prior_path(prior)
    source = source if source.is_dir() else source.parent
    config = PriorConfig.read(source / CONFIG_FILE)
    expect((source / WEIGHTS_FILE).is_file(), "prior", f"a folder with {WEIGHTS_FILE}", str(source))
    expect(isinstance(physics, str) and ":" in physics, "physics", "a physics spec such as "
           "'mri:accel=4,center=0.08,noise=0.01'", physics)
    out = Path(out)
    if out.exists():
        expect(overwrite, str(out), "a new folder (or overwrite=True / --overwrite)", "an existing path")
        expect((out / "configs" / "metadata.json").is_file(), str(out),
               "an existing bundle folder to overwrite (with configs/metadata.json)", "something else")
    if sample is not None:
        sample = Path(sample)
        expect(sample.is_file() and sample.name.endswith((".nii", ".nii.gz")), "sample",
               "an existing .nii / .nii.gz file", str(sample))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for sub in ("configs", "models", "docs"):
            (tmp / sub).mkdir()
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            shutil.copy2(source / name, tmp / "models" / name)
        if (source / "nulls").is_dir():
            shutil.copytree(source / "nulls", tmp / "models" / "nulls")
        shutil.copy2(SCHEMA_FILE, tmp / "configs" / SCHEMA_NAME)
        (tmp / "configs" / "logging.conf").write_text(LOGGING_CONF, encoding="utf-8")
        for name, content in (("metadata.json", metadata(config, physics)),
                              ("inference.json", inference_config(physics, samples, steps, sampler, seed))):
            (tmp / "configs" / name).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
        card_path = source / "MODEL_CARD.md"
        card = card_path.read_text(encoding="utf-8") if card_path.is_file() else "(no model card shipped)"
        (tmp / "docs" / "README.md").write_text(
            readme(config, physics, card, sample.name if sample else None, sample_note), encoding="utf-8")
        if sample is not None:
            (tmp / "sample_data").mkdir()
            shutil.copy2(sample, tmp / "sample_data" / sample.name)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
